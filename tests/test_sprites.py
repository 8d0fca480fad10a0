"""Tests for hvae.datasets.make_sprites / Sprites: the dSprites-like images
with known factors, and the FactorDataset they are built on."""

import numpy as np
import pytest

from hvae.datasets import (SPRITES_FACTOR_NAMES, SPRITES_FACTOR_SIZES, FactorDataset, Sprites,
                           make_sprites)

# A sprite in the middle of the frame at the middle scale; tests vary one factor.
BASE = {"shape": 1, "scale": 3, "orientation": 0, "pos_x": 16, "pos_y": 16}


def factors_varying(name, classes, **fixed):
    """Factor rows equal to BASE (updated by `fixed`) except `name`, which runs over `classes`."""
    row = dict(BASE, **fixed)
    rows = []
    for c in classes:
        row[name] = c
        rows.append([row[n] for n in SPRITES_FACTOR_NAMES])
    return np.array(rows, dtype=np.int64)


def centroid(images):
    """(x, y) centroid of each (n, s, s) image in pixel units, y growing downwards."""
    s = images.shape[-1]
    mass = images.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    return ((images * xs).sum(axis=(1, 2)) / mass, (images * ys).sum(axis=(1, 2)) / mass)


def principal_angle(image):
    """Angle in [0, pi) of the long axis of a binary image, counter-clockwise as displayed."""
    rows, cols = np.nonzero(image)
    x = cols - cols.mean()
    y = -(rows - rows.mean())
    cov = np.cov(np.stack([x, y]))
    eigvals, eigvecs = np.linalg.eigh(cov)
    vx, vy = eigvecs[:, -1]
    return np.arctan2(vy, vx) % np.pi


def test_factor_names_and_sizes():
    assert SPRITES_FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert SPRITES_FACTOR_SIZES == (3, 6, 40, 32, 32)
    ds = Sprites()
    assert ds.n_combinations == 737280
    grid = ds.grid_factors()
    assert grid.shape == (737280, 5)
    # dSprites' order: shape slowest, pos_y fastest, every combination once.
    assert grid[1].tolist() == [0, 0, 0, 0, 1] and grid[-1].tolist() == [2, 5, 39, 31, 31]
    assert np.bincount(np.ravel_multi_index(tuple(grid.T), SPRITES_FACTOR_SIZES)).min() == 1


@pytest.mark.parametrize("image_size", [64, 32])
def test_shapes_dtype_binary_and_determinism(image_size):
    X, factors = make_sprites(300, image_size=image_size, random_state=3)
    assert X.shape == (300, image_size**2) and X.dtype == np.float32
    assert factors.shape == (300, 5) and factors.dtype == np.int64
    assert set(np.unique(X).tolist()) == {0.0, 1.0}
    assert np.all(X.sum(axis=1) > 0)
    assert np.all(factors >= 0) and np.all(factors < np.array(SPRITES_FACTOR_SIZES))
    # A subset has distinct combinations.
    assert len(np.unique(factors, axis=0)) == 300
    X2, factors2 = make_sprites(300, image_size=image_size, random_state=3)
    assert np.array_equal(X, X2) and np.array_equal(factors, factors2)
    X3, factors3 = make_sprites(300, image_size=image_size, random_state=4)
    assert not np.array_equal(factors, factors3)
    # Rendering does not depend on the batch: the same factors give the same pixels.
    Xi, _ = make_sprites(300, image_size=image_size, flatten=False, random_state=3)
    assert Xi.shape == (300, image_size, image_size)
    assert np.array_equal(Xi.reshape(300, -1), X)
    assert np.array_equal(Sprites(image_size).render(factors[::-1]), X[::-1])


def test_return_values_and_dtype():
    X, factors, values = make_sprites(50, image_size=16, random_state=0, return_values=True,
                                      dtype=np.uint8)
    assert X.dtype == np.uint8 and values.shape == (50, 5)
    assert np.array_equal(values[:, 0], factors[:, 0])
    assert np.allclose(values[:, 1], 0.5 + 0.1 * factors[:, 1])
    assert np.allclose(values[:, 2], 2 * np.pi * factors[:, 2] / 40)
    assert np.allclose(values[:, 3:], factors[:, 3:] / 31)


def test_full_grid_small_images_matches_render():
    # The full grid at 8 x 8 (47 MB as uint8) is cheap and must agree with render.
    X, factors = make_sprites(image_size=8, dtype=np.uint8)
    assert X.shape == (737280, 64)
    rows = np.random.default_rng(0).integers(0, 737280, 200)
    assert np.array_equal(Sprites(8, dtype=np.uint8).render(factors[rows]), X[rows])


@pytest.mark.parametrize("image_size", [64, 32])
def test_pos_x_and_pos_y_move_the_centroid(image_size):
    for shape in range(3):
        images = Sprites(image_size, flatten=False).render(
            factors_varying("pos_x", range(32), shape=shape))
        cx, cy = centroid(images)
        assert np.all(np.diff(cx) > 0), cx
        # The centroid sits at (0.15 + 0.7 pos) * size, within half a pixel or so.
        expected = (0.15 + 0.7 * np.linspace(0, 1, 32)) * image_size
        assert np.max(np.abs(cx - expected)) < 0.6
        assert np.ptp(cy) < 0.6
        images = Sprites(image_size, flatten=False).render(
            factors_varying("pos_y", range(32), shape=shape))
        cx, cy = centroid(images)
        assert np.all(np.diff(cy) > 0) and np.ptp(cx) < 0.6


@pytest.mark.parametrize("image_size", [64, 32])
def test_scale_increases_pixel_count(image_size):
    for shape in range(3):
        for orientation in (0, 7):
            images = Sprites(image_size).render(
                factors_varying("scale", range(6), shape=shape, orientation=orientation))
            counts = images.sum(axis=1)
            # At 32 x 32 two neighbouring scales of the smallest sprites can
            # round to the same pixels; never fewer.
            if image_size == 64:
                assert np.all(np.diff(counts) > 0), counts
            else:
                assert np.all(np.diff(counts) >= 0) and counts[-1] > counts[2] > counts[0], counts
            # Area grows with scale squared: (1 / 0.5)^2 = 4, within rasterisation error.
            assert 3.0 < counts[-1] / counts[0] < 5.5


@pytest.mark.parametrize("image_size", [64, 32])
def test_orientation_rotates_the_ellipse_principal_axis(image_size):
    images = Sprites(image_size, flatten=False).render(
        factors_varying("orientation", range(40), shape=1, scale=5))
    angles = np.array([principal_angle(im) for im in images])
    expected = (2 * np.pi * np.arange(40) / 40) % np.pi
    error = np.abs((angles - expected + np.pi / 2) % np.pi - np.pi / 2)
    assert error.max() < (0.05 if image_size == 64 else 0.12), error.max()


def test_orientation_symmetries_and_heart_rotation():
    ds = Sprites(64, flatten=False)
    # The square repeats every quarter turn (10 classes), the ellipse every half turn.
    square = ds.render(factors_varying("orientation", [3, 13, 23], shape=0))
    assert np.array_equal(square[0], square[1]) and np.array_equal(square[0], square[2])
    ellipse = ds.render(factors_varying("orientation", [3, 23], shape=1))
    assert np.array_equal(ellipse[0], ellipse[1])
    # The heart has no rotational symmetry; its point (the long tail of its
    # mass) is down at orientation 0, right at a quarter turn (counter-
    # clockwise as displayed), up at half a turn and left at three quarters.
    heart = ds.render(factors_varying("orientation", [0, 10, 20, 30], shape=2, scale=5))
    s = heart.shape[-1]
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    cx, cy = centroid(heart)
    skew_down = [(h * (ys - y) ** 3).sum() for h, y in zip(heart, cy)]
    skew_right = [(h * (xs - x) ** 3).sum() for h, x in zip(heart, cx)]
    assert skew_down[0] > 0 and skew_right[1] > 0 and skew_down[2] < 0 and skew_right[3] < 0
    assert abs(skew_right[0]) < 0.1 * skew_down[0] and abs(skew_down[1]) < 0.1 * skew_right[1]


def test_shapes_differ_and_stay_inside_the_frame():
    ds = Sprites(32, flatten=False)
    corners = np.array([[s, 5, o, x, y] for s in range(3) for o in (0, 5) for x in (0, 31)
                        for y in (0, 31)])
    images = ds.render(corners)
    # The largest sprites in the corners stay inside (margin >= radius): no clipping
    # shows as a pixel count equal to the same sprite in the middle.
    middle = corners.copy()
    middle[:, 3:] = 16
    assert np.abs(images.sum(axis=(1, 2)) - ds.render(middle).sum(axis=(1, 2))).max() <= 6
    square, ellipse, heart = ds.render(factors_varying("shape", range(3), scale=5))
    assert not np.array_equal(square, ellipse) and not np.array_equal(ellipse, heart)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_sprites(737281, image_size=8)
    with pytest.raises(ValueError):
        Sprites(image_size=4)
    with pytest.raises(ValueError):
        Sprites(16).render(np.array([[3, 0, 0, 0, 0]]))


def test_factor_dataset_sampling_and_from_grid():
    ds = FactorDataset([3, 4, 5], render=lambda f: f * 10)
    X, factors = ds.sample(1000, random_state=0)
    assert np.array_equal(X, factors * 10)
    # Uniform and independent: every class appears.
    assert [len(np.unique(factors[:, j])) for j in range(3)] == [3, 4, 5]
    batches = ds.sample_fixed_factor([0, 1, 2, 1], n_batches=4, batch_size=50, random_state=1)
    assert batches.shape == (4, 50, 3)
    for b, j in enumerate([0, 1, 2, 1]):
        assert len(np.unique(batches[b, :, j])) == 1
        others = [k for k in range(3) if k != j]
        assert all(len(np.unique(batches[b, :, k])) > 1 for k in others)
    # from_grid: stored observations covering the grid, in shuffled order.
    grid = np.stack(np.unravel_index(np.arange(60), (3, 4, 5)), axis=1)
    order = np.random.default_rng(2).permutation(60)
    stored = FactorDataset.from_grid(grid[order] * 7, grid[order])
    assert stored.factor_sizes == (3, 4, 5)
    assert np.array_equal(stored.render(factors), factors * 7)
    with pytest.raises(ValueError):
        FactorDataset.from_grid(grid[:-1], grid[:-1], factor_sizes=(3, 4, 5))
