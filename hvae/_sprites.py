"""dSprites-like images with known factors, generated on the fly.

:func:`make_sprites` returns the images and their factors as arrays;
:class:`Sprites` is the same generator as a :class:`FactorDataset` that the
metrics of :mod:`hvae.metrics` draw from. Both are re-exported by
:mod:`hvae.datasets`; :func:`make_sprites`' Notes describe the geometry and
how it differs from dSprites.
"""

from __future__ import annotations

import numpy as np

from ._factor_dataset import FactorDataset, _as_generator

__all__ = ["SPRITES_FACTOR_NAMES", "SPRITES_FACTOR_SIZES", "SPRITES_SHAPE_NAMES", "Sprites",
           "make_sprites"]

SPRITES_FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
SPRITES_FACTOR_SIZES = (3, 6, 40, 32, 32)
SPRITES_SHAPE_NAMES = ("square", "ellipse", "heart")

# Radius of a scale-1 sprite's bounding disc, and the margin of its centre,
# as fractions of the image side. With radius <= margin every sprite lies
# inside the frame, so no sprite is ever clipped.
_RADIUS = 0.15
_MARGIN = 0.15

_SQUARE_HALF_SIDE = 0.7
_ELLIPSE_AXES = (1.0, 0.5)
# The heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 has its centroid at
# y = 0.2935 and reaches 1.2935 from it; shrinking by 1.3 puts it in the disc.
_HEART_CENTROID_Y = 0.2935
_HEART_SHRINK = 1.3

# Chunk of images rasterised at once: bounds the temporaries (a few arrays of
# chunk * window**2 float32) to some tens of MB whatever n is.
_CHUNK = 8192


def _sprite_factor_values():
    return (
        np.arange(3, dtype=np.float64),
        np.linspace(0.5, 1.0, 6),
        2.0 * np.pi * np.arange(40) / 40.0,
        np.linspace(0.0, 1.0, 32),
        np.linspace(0.0, 1.0, 32),
    )


def _inside(shape, u, v):
    """Whether canonical points (u, v) (v up) lie inside one shape.

    shape: int class; u, v: (n, w, w) float32. Returns (n, w, w) bool.
    """
    if shape == 0:
        return (np.abs(u) <= _SQUARE_HALF_SIDE) & (np.abs(v) <= _SQUARE_HALF_SIDE)
    if shape == 1:
        a, b = _ELLIPSE_AXES
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    x = u * _HEART_SHRINK
    y = v * _HEART_SHRINK + _HEART_CENTROID_Y
    r = x * x + y * y - 1.0
    return r * r * r - x * x * y * y * y <= 0.0


def _render_sprites(factors, image_size, out):
    """Rasterise factor classes (n, 5) into out (n, image_size, image_size), zeroed."""
    values = _sprite_factor_values()
    size = int(image_size)
    # Pixels a sprite can touch: its disc's diameter plus one on each side
    # for the rounding of the window's corner.
    window = int(np.ceil(2 * _RADIUS * size)) + 2
    window = min(window, size)
    offsets = np.arange(window, dtype=np.float32)
    for start in range(0, len(factors), _CHUNK):
        f = factors[start:start + _CHUNK]
        n = len(f)
        radius = (_RADIUS * size * values[1][f[:, 1]]).astype(np.float32)[:, None, None]
        theta = values[2][f[:, 2]]
        cos = np.cos(theta).astype(np.float32)[:, None, None]
        sin = np.sin(theta).astype(np.float32)[:, None, None]
        cx = (_MARGIN + (1 - 2 * _MARGIN) * values[3][f[:, 3]]) * size
        cy = (_MARGIN + (1 - 2 * _MARGIN) * values[4][f[:, 4]]) * size
        left = np.clip(np.floor(cx - window / 2), 0, size - window).astype(np.int64)
        top = np.clip(np.floor(cy - window / 2), 0, size - window).astype(np.int64)
        # Pixel centres of each window relative to the sprite's centre, in
        # units of its radius; y flipped so that angles turn counter-clockwise
        # as the image is displayed (rows grow downwards).
        dx = ((left - cx).astype(np.float32)[:, None] + offsets + 0.5)[:, None, :] / radius
        dy = -((top - cy).astype(np.float32)[:, None] + offsets + 0.5)[:, :, None] / radius
        # Rotate the pixels by -theta, i.e. the shape by +theta.
        u = cos * dx + sin * dy
        v = cos * dy - sin * dx
        mask = np.empty(u.shape, dtype=bool)
        for shape in range(3):
            rows = np.flatnonzero(f[:, 0] == shape)
            mask[rows] = _inside(shape, u[rows], v[rows])
        # Flat index of every window pixel in `out`; only the pixels inside
        # a shape are written (out is zeroed), a small fraction of the window.
        flat = ((start + np.arange(n)) * (size * size) + top * size + left)[:, None, None] \
            + (np.arange(window) * size)[None, :, None] + np.arange(window)[None, None, :]
        out.reshape(-1)[flat[mask]] = 1
    return out


class Sprites(FactorDataset):
    """The dSprites-like factor data set of :func:`make_sprites`, rendered on demand.

    Use it with the metrics of :mod:`hvae.metrics`, which draw their own
    factors (for example batches with one factor fixed) and render them.

    Parameters
    ----------
    image_size : int, default=64
        Side of the square images in pixels (at least 8).
    flatten : bool, default=True
        Render ``(n, image_size**2)`` rows rather than ``(n, image_size, image_size)``.
    dtype : numpy dtype, default=numpy.float32
        Pixel type; pixels are 0 or 1.

    Attributes
    ----------
    factor_sizes : tuple of int
        ``(3, 6, 40, 32, 32)``.
    factor_names : tuple of str
        ``("shape", "scale", "orientation", "pos_x", "pos_y")``.
    shape_names : tuple of str
        ``("square", "ellipse", "heart")``: the names of the shape classes.

    See Also
    --------
    make_sprites : the images and factors as arrays; its Notes describe the
        geometry and how it differs from dSprites.

    Examples
    --------
    >>> ds = Sprites(image_size=32)
    >>> X, factors = ds.sample(100, random_state=0)
    >>> X.shape, factors.shape
    ((100, 1024), (100, 5))
    """

    shape_names = SPRITES_SHAPE_NAMES

    def __init__(self, image_size=64, flatten=True, dtype=np.float32):
        image_size = int(image_size)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.image_size = image_size
        self.flatten = bool(flatten)
        self.dtype = np.dtype(dtype)
        super().__init__(SPRITES_FACTOR_SIZES, self._render_factors,
                         factor_names=SPRITES_FACTOR_NAMES,
                         factor_values=_sprite_factor_values())

    def _render_factors(self, factors):
        s = self.image_size
        out = np.zeros((len(factors), s, s), dtype=self.dtype)
        _render_sprites(factors, s, out)
        return out.reshape(len(factors), s * s) if self.flatten else out

    def grid_factors(self):
        """Every combination of factor classes, in dSprites' order.

        Returns
        -------
        factors : ndarray of int64, shape (737280, 5)
            Shape varies slowest and pos_y fastest.
        """
        return grid_index_to_factors(np.arange(self.n_combinations))


def grid_index_to_factors(index):
    """Factor classes of rows of the full sprite grid.

    Parameters
    ----------
    index : array-like of int, shape (n,)
        Row numbers in 0 .. 737279 (dSprites' order: shape slowest, pos_y fastest).

    Returns
    -------
    factors : ndarray of int64, shape (n, 5)
    """
    return np.stack(np.unravel_index(np.asarray(index, dtype=np.int64), SPRITES_FACTOR_SIZES),
                    axis=1).astype(np.int64)


def make_sprites(n_samples=None, *, image_size=64, flatten=True, random_state=None,
                 return_values=False, dtype=np.float32):
    """Generate dSprites-like images with their five known factors.

    An imitation of dSprites (Matthey, Higgins, Hassabis and Lerchner 2017,
    https://github.com/deepmind/dsprites-dataset), which cannot be downloaded
    here: a white square, ellipse or heart on black, at 6 scales, 40
    orientations and 32 x 32 positions. Fully deterministic; nothing is
    downloaded. The Notes say how the images are drawn and exactly how they
    differ from dSprites.

    Parameters
    ----------
    n_samples : int or None, default=None
        None renders the full grid of 737,280 images in dSprites' order
        (shape slowest, pos_y fastest); see Memory below. An int draws that
        many distinct combinations uniformly without replacement, in random
        order, and renders only those.
    image_size : int, default=64
        Side of the square images in pixels (at least 8); the geometry scales
        with it.
    flatten : bool, default=True
        Return ``(n, image_size**2)`` rows (what :class:`hvae.HierarchicalVAE`
        takes) rather than ``(n, image_size, image_size)`` images.
    random_state : None, int or numpy.random.Generator, default=None
        Seeds the choice of the subset; unused when ``n_samples`` is None.
    return_values : bool, default=False
        Also return the factors' physical values.
    dtype : numpy dtype, default=numpy.float32
        Pixel type (``np.uint8`` for a quarter of the memory).

    Returns
    -------
    X : ndarray of shape (n, image_size**2) or (n, image_size, image_size)
        Pixels in {0, 1}.
    factors : ndarray of int64, shape (n, 5)
        Factor classes in the order of ``SPRITES_FACTOR_NAMES`` =
        ``("shape", "scale", "orientation", "pos_x", "pos_y")``, class counts
        ``SPRITES_FACTOR_SIZES`` = ``(3, 6, 40, 32, 32)``.
    values : ndarray of float64, shape (n, 5)
        Only when ``return_values``: shape class (0 square, 1 ellipse,
        2 heart), scale in [0.5, 1], orientation in radians in [0, 2 pi),
        pos_x and pos_y in [0, 1].

    See Also
    --------
    Sprites : the same images rendered on demand from any factors, as the
        metrics in :mod:`hvae.metrics` need.

    Notes
    -----
    Factors (the same counts as dSprites):

    ====  ============  =======  ==============================================
     j    name          classes  values
    ====  ============  =======  ==============================================
     0    shape         3        0 square, 1 ellipse, 2 heart
     1    scale         6        linspace(0.5, 1, 6)
     2    orientation   40       2 pi k / 40, k = 0..39 (radians, counter-clockwise)
     3    pos_x         32       linspace(0, 1, 32): left to right
     4    pos_y         32       linspace(0, 1, 32): top to bottom
    ====  ============  =======  ==============================================

    so 3 * 6 * 40 * 32 * 32 = 737,280 combinations, in dSprites' order (shape
    slowest, pos_y fastest).

    How the images are drawn: each shape is defined in its own coordinates
    inside the unit disc about its centroid (square of half-side 0.7; ellipse of
    semi-axes 1 and 0.5, long axis along x at orientation 0; heart bounded by
    ``(x^2 + y^2 - 1)^3 - x^2 y^3 <= 0``, point down at orientation 0, shifted
    so that its centroid is the origin and shrunk by 1.3). The disc is scaled to
    radius ``0.15 * scale * image_size`` pixels, rotated by the orientation
    counter-clockwise as the image is displayed, and its centre (the shape's
    centroid) placed at ``(0.15 + 0.7 * pos) * image_size`` pixels from the
    left/top edge, so that every shape lies inside the frame at every factor
    value. A pixel is 1 when its centre falls inside the shape and 0 otherwise.

    How this differs from dSprites:

    * The shapes are drawn here from formulas, not from dSprites' bitmaps: the
      heart is the algebraic heart curve above, the ellipse's aspect ratio (2:1)
      and all sizes and margins are ours, so the pixels differ from dSprites'
      even where the factors agree.
    * Rasterisation is point sampling at pixel centres (hard edges, no
      anti-aliasing); smaller images (``image_size=32``) are rendered directly at
      that size from the same geometry, not downsampled from 64 x 64.
    * Orientation takes 40 values over [0, 2 pi), ``2 pi k / 40``; dSprites uses
      ``linspace(0, 2 pi, 40)``, whose first and last values show the same image.
      As in dSprites, the square repeats every quarter turn and the ellipse
      every half turn, so orientation is partly unidentifiable for them.
    * Shape classes are 0, 1, 2 (dSprites' ``latents_values`` call them 1, 2, 3)
      and there is no constant colour factor: factors here are dSprites' latent
      factors 1..5, as disentanglement_lib's ``dsprites_full`` uses them.

    Memory and time: the full grid holds ``737,280 * image_size**2`` pixels:
    12.1 GB as float32 at 64 x 64 (3.0 GB as ``np.uint8``, the size of
    dSprites' own array), 3.0 GB as float32 at 32 x 32, and takes some 20 s
    to render. A subset costs only its own rows (20,000 images at 32 x 32:
    about 0.1 s; at 64 x 64: about 0.5 s). To stream the grid, render slices
    of ``Sprites(...).grid_factors()`` with ``Sprites.render``.

    Examples
    --------
    >>> X, factors = make_sprites(20000, image_size=32, random_state=0)
    >>> X.shape, X.dtype, factors.shape
    ((20000, 1024), dtype('float32'), (20000, 5))
    """
    dataset = Sprites(image_size=image_size, flatten=flatten, dtype=dtype)
    if n_samples is None:
        factors = dataset.grid_factors()
    else:
        n_samples = int(n_samples)
        if not 0 <= n_samples <= dataset.n_combinations:
            raise ValueError(f"n_samples must be in 0..{dataset.n_combinations}, got {n_samples}")
        rng = _as_generator(random_state)
        index = rng.choice(dataset.n_combinations, size=n_samples, replace=False)
        factors = grid_index_to_factors(index)
    X = dataset.render(factors)
    if return_values:
        return X, factors, dataset.factor_values(factors)
    return X, factors
