"""Pictures of a fitted HierarchicalVAE: training curves, samples, reconstructions,
latent spaces and interpolations, each in one call.

Needs matplotlib (``pip install "hvae[plot]"``), imported only when a function
here is called. Every function returns the matplotlib Figure it drew on and
takes an optional ``ax``: None draws a new figure (through pyplot, so it shows
in Jupyter and with ``plt.show()``); one Axes draws the first panel there; a
sequence of Axes draws one panel in each. In Jupyter, end a cell with ``;`` or
assign the result, or the figure shows twice.

Images: when ``image_shape`` is None, data with a square number of features
(64 = 8x8 digits, 784 = 28x28) are shown as square images; other data are
shown as a heatmap of rows (samples) by features.
"""
import math
import numbers

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = ["plot_history", "plot_samples", "plot_reconstructions", "plot_latent",
           "plot_interpolation"]

_PANEL_SIZE = (4.2, 3.4)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError('hvae.plot needs matplotlib: pip install "hvae[plot]"') from error
    return plt


def _axes(ax, n_panels, panel_size=_PANEL_SIZE):
    """(figure, list of Axes): new panels, or the caller's."""
    if ax is None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, n_panels, squeeze=False, layout="constrained",
                                 figsize=(panel_size[0] * n_panels, panel_size[1]))
        return fig, list(axes[0])
    if hasattr(ax, "plot"):  # one Axes: the first panel only
        return ax.figure, [ax]
    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) < n_panels:
        raise ValueError(f"ax holds {len(axes)} Axes; this plot has {n_panels} panels "
                         "(pass one Axes for the first panel only)")
    return axes[0].figure, axes[:n_panels]


def _image_shape(n_features, image_shape):
    """(height, width) for rows of n_features values, or None for non-images."""
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 2 or shape[0] * shape[1] != n_features:
            raise ValueError(f"image_shape {image_shape} does not hold {n_features} features")
        return shape
    side = math.isqrt(n_features)
    return (side, side) if side * side == n_features and side > 1 else None


def _tile(images, image_shape, n_cols):
    """One array showing the rows of ``images`` as a grid, NaN between them."""
    h, w = image_shape
    n = len(images)
    n_cols = max(1, min(n_cols, n))
    n_rows = max(1, math.ceil(n / n_cols))
    grid = np.full((n_rows * (h + 1) - 1, n_cols * (w + 1) - 1), np.nan)
    for i, image in enumerate(images):
        r, c = divmod(i, n_cols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image.reshape(h, w)
    return grid


def _value_range(model, *arrays):
    if model.model_.likelihood == "bernoulli":
        return 0.0, 1.0
    values = np.concatenate([np.ravel(a) for a in arrays])
    return float(np.nanmin(values)), float(np.nanmax(values))


def _show_rows(ax, rows, image_shape, n_cols, vmin, vmax, cmap):
    """Rows as an image grid, or as a samples-by-features heatmap."""
    if image_shape is not None:
        image = ax.imshow(_tile(rows, image_shape, n_cols), cmap=cmap, vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        ax.set_axis_off()
    else:
        image = ax.imshow(rows, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_xlabel("feature")
        ax.set_ylabel("row")
        ax.figure.colorbar(image, ax=ax)
    return image


def _conditions(model, y):
    """y as the model's condition argument: only a conditional model takes it."""
    return {"y": y} if model.model_.n_conditions > 0 else {}


# ---- training curves ------------------------------------------------------------


def plot_history(model, ax=None):
    """ELBO, reconstruction and per-layer KL of every epoch, in nats.

    Three panels against the epoch number (1, 2, ...): the ELBO, the
    reconstruction term log p(x | z_1), and one KL term per latent layer.
    Training values are solid lines (the epoch's minibatch averages);
    validation values, when ``fit`` had validation rows, are dashed. With
    ``early_stopping``, a dotted vertical line marks the epoch whose
    parameters the model holds. For the IWAE objective the ELBO panel also
    shows the trained bound.

    Parameters
    ----------
    model : HierarchicalVAE
        A fitted estimator.
    ax : matplotlib Axes, sequence of 3 Axes, or None
        Where to draw; one Axes gets the ELBO panel only.

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    check_is_fitted(model)
    history = model.history_
    fig, axes = _axes(ax, 3)
    epochs = np.arange(1, len(history["elbo"]) + 1)
    validation = "val_elbo" in history

    elbo_ax = axes[0]
    elbo_ax.plot(epochs, history["elbo"], label="train")
    objective = history.get("objective")
    if objective is not None and len(objective) == len(epochs) and not np.allclose(
            objective, history["elbo"], equal_nan=True):
        elbo_ax.plot(epochs, objective, label=f"train {getattr(model, 'objective', '')} bound")
    if validation:
        elbo_ax.plot(epochs, history["val_elbo"], "--", label="validation")
    best = getattr(model, "best_epoch_", None)
    if best is not None:
        elbo_ax.axvline(best + 1, color="gray", linestyle=":", label="best epoch")
    elbo_ax.set_title("ELBO")
    elbo_ax.set_ylabel("ELBO (nats)")
    panels = [elbo_ax]

    if len(axes) > 1:
        rec_ax = axes[1]
        rec_ax.plot(epochs, history["reconstruction"], label="train")
        if validation:
            rec_ax.plot(epochs, history["val_reconstruction"], "--", label="validation")
        rec_ax.set_title("Reconstruction")
        rec_ax.set_ylabel("log p(x | z_1) (nats)")

        kl_ax = axes[2]
        kl = np.array(history["kl"], dtype=float).reshape(len(epochs), -1)
        val_kl = (np.array(history["val_kl"], dtype=float).reshape(len(epochs), -1)
                  if validation else None)
        for layer in range(kl.shape[1]):
            line, = kl_ax.plot(epochs, kl[:, layer], label=f"layer {layer + 1}")
            if val_kl is not None:
                kl_ax.plot(epochs, val_kl[:, layer], "--", color=line.get_color(),
                           label=f"layer {layer + 1} (validation)")
        kl_ax.set_title("KL per layer")
        kl_ax.set_ylabel("KL (nats)")
        panels += [rec_ax, kl_ax]

    for panel in panels:
        panel.set_xlabel("epoch")
        if len(panel.get_lines()) > 1:
            panel.legend(fontsize="small")
    return fig


# ---- samples and reconstructions -------------------------------------------------


def plot_samples(model, n=16, *, image_shape=None, n_cols=None, random_state=0, y=None,
                 cmap="gray", ax=None):
    """A grid of n samples (the mean of p(x | z_1) for ancestral draws of z).

    Parameters
    ----------
    model : HierarchicalVAE
        A fitted estimator.
    n : int, default=16
        Number of samples.
    image_shape : (height, width) or None
        Shape of one image; None guesses a square (see the module doc).
    n_cols : int or None
        Images per row (None: about sqrt(n)).
    random_state : int, RandomState or None, default=0
        Seeds the draw.
    y : label, array-like or None
        The condition of the draws, for a conditional model.
    cmap : str, default='gray'
        Matplotlib colormap ('gray_r' shows ink dark on white).
    ax : matplotlib Axes or None

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    check_is_fitted(model)
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    samples = model.sample(int(n), random_state=random_state, **_conditions(model, y))
    shape = _image_shape(samples.shape[1], image_shape)
    n_cols = n_cols or math.ceil(math.sqrt(n))
    fig, (ax,) = _axes(ax, 1, panel_size=(5.0, 5.0))
    _show_rows(ax, samples, shape, n_cols, *_value_range(model, samples), cmap)
    ax.set_title(f"{n} samples")
    return fig


def plot_reconstructions(model, X, n=10, *, y=None, image_shape=None, n_cols=None,
                         cmap="gray", ax=None):
    """The first n rows of X above their reconstructions.

    Reconstructions are the decoded posterior means (``reconstruct``). The
    grid alternates rows of data and rows of their reconstructions, n_cols
    images wide.

    Parameters
    ----------
    model : HierarchicalVAE
        A fitted estimator.
    X : array-like of shape (n_samples, n_features)
    n : int, default=10
        How many rows of X to show (at most len(X)).
    y : array-like or None
        Conditions of the rows, for a conditional model.
    image_shape : (height, width) or None
        Shape of one image; None guesses a square (see the module doc).
    n_cols : int or None
        Images per row (None: n, so one row of data and one of reconstructions).
    cmap : str, default='gray'
    ax : matplotlib Axes or None

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    check_is_fitted(model)
    X = np.asarray(X)
    n = min(int(n), len(X))
    if n < 1:
        raise ValueError("X has no rows to reconstruct")
    conditions = _conditions(model, None if y is None else np.asarray(y)[:n])
    originals = np.asarray(X[:n], dtype=np.float32)
    reconstructions = model.reconstruct(originals, **conditions)
    shape = _image_shape(originals.shape[1], image_shape)
    vmin, vmax = _value_range(model, originals, reconstructions)
    if shape is not None:
        n_cols = min(n_cols or n, n)
        rows = []
        for start in range(0, n, n_cols):
            block = slice(start, min(start + n_cols, n))
            pad = n_cols - (block.stop - block.start)
            blank = np.full((pad, originals.shape[1]), np.nan)
            rows += [originals[block], blank, reconstructions[block], blank]
        width, height = 0.5 * n_cols + 0.5, 1.1 * math.ceil(n / n_cols) + 0.6
        fig, (ax,) = _axes(ax, 1, panel_size=(max(width, 3.0), height))
        _show_rows(ax, np.vstack(rows), shape, n_cols, vmin, vmax, cmap)
        ax.set_title("data above, reconstruction below", fontsize="medium")
    else:
        fig, (ax,) = _axes(ax, 1, panel_size=(6.0, 4.0))
        gap = np.full((1, originals.shape[1]), np.nan)
        _show_rows(ax, np.vstack([originals, gap, reconstructions]), None, 1, vmin, vmax,
                   cmap)
        ax.set_title(f"data (rows 0-{n - 1}) and reconstructions (rows {n + 1}-{2 * n})")
    return fig


# ---- latent space ----------------------------------------------------------------


def plot_latent(model, X, y=None, *, layers=None, ax=None, s=8, cmap=None):
    """Posterior means of X in each latent layer, as 2-D scatters coloured by y.

    A layer of 2 dimensions is drawn as is; a wider one through the first
    two principal components of its means over X; a 1-D layer against zero.
    Layers above the first are the means given the mean of the layer below
    (``encode``).

    Parameters
    ----------
    model : HierarchicalVAE
        A fitted estimator.
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,) or None
        Colours the points: up to 20 distinct labels get distinct colours and
        a legend, other values a colour scale. A conditional model is also
        encoded given y.
    layers : int, sequence of int or None
        Latent layers to draw, numbered from 1 (None: all).
    ax : matplotlib Axes, sequence of Axes, or None
        One Axes per drawn layer; one Axes gets the first of them only.
    s : float, default=8
        Marker size.
    cmap : str or None
        Colormap (None: 'tab10'/'tab20' for labels, 'viridis' for values).

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    check_is_fitted(model)
    means = [mu for mu, _ in model.encode(X, **_conditions(model, y))]
    if layers is None:
        layers = list(range(1, len(means) + 1))
    elif isinstance(layers, numbers.Integral):
        layers = [int(layers)]
    layers = list(layers)
    for layer in layers:
        if not 1 <= layer <= len(means):
            raise ValueError(f"layers must be between 1 and {len(means)}; got {layer}")
    colours, colour_kwargs, legend_labels = None, {}, None
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(means[0]):
            raise ValueError(f"y has {len(y)} values for {len(means[0])} rows")
        labels = np.unique(y)
        if len(labels) <= 20 and (y.dtype.kind in "iubUSO" or len(labels) <= 10):
            colours = np.searchsorted(labels, y)
            colour_kwargs = {"cmap": cmap or ("tab10" if len(labels) <= 10 else "tab20"),
                             "vmin": -0.5, "vmax": (9.5 if len(labels) <= 10 else 19.5)}
            legend_labels = labels
        else:
            colours = y.astype(float)
            colour_kwargs = {"cmap": cmap or "viridis"}

    fig, axes = _axes(ax, len(layers))
    for panel, layer in zip(axes, layers):
        Z = np.asarray(means[layer - 1], dtype=np.float64)
        name = f"z_{layer}"
        if Z.shape[1] == 1:
            xy = np.column_stack([Z[:, 0], np.zeros(len(Z))])
            labels_xy = (f"{name} (posterior mean)", "")
            panel.set_yticks([])
        elif Z.shape[1] == 2:
            xy = Z
            labels_xy = (f"{name}[0]", f"{name}[1]")
        else:
            centred = Z - Z.mean(axis=0)
            _, singular, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T
            share = singular[:2] ** 2 / max(np.sum(singular ** 2), 1e-300)
            labels_xy = (f"PC 1 of {name} means ({share[0]:.0%})",
                         f"PC 2 of {name} means ({share[1]:.0%})")
        points = panel.scatter(xy[:, 0], xy[:, 1], c=colours, s=s, linewidths=0,
                               **colour_kwargs)
        panel.set_xlabel(labels_xy[0])
        panel.set_ylabel(labels_xy[1])
        panel.set_title(f"layer {layer} ({Z.shape[1]}-D)")
        if legend_labels is not None and panel is axes[-1]:
            handles, _ = points.legend_elements(num=list(range(len(legend_labels))))
            panel.legend(handles, [str(label) for label in legend_labels], title="y",
                         fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        elif y is not None and legend_labels is None and panel is axes[-1]:
            fig.colorbar(points, ax=panel, label="y")
    return fig


def plot_interpolation(model, x_a, x_b, n_steps=8, *, y=None, image_shape=None,
                       cmap="gray", ax=None):
    """Decodings along the straight line between the z_1 means of two inputs.

    The row shows x_a, then the mean of p(x | z_1) at n_steps evenly spaced
    points from z_1(x_a) to z_1(x_b) (both ends included), then x_b.

    Parameters
    ----------
    model : HierarchicalVAE
        A fitted estimator.
    x_a, x_b : array-like of shape (n_features,)
        The two inputs.
    n_steps : int, default=8
        Points on the line, ends included (>= 2).
    y : label or None
        The condition of both inputs and every decoding, for a conditional model.
    image_shape : (height, width) or None
    cmap : str, default='gray'
    ax : matplotlib Axes or None

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    check_is_fitted(model)
    if not isinstance(n_steps, numbers.Integral) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2; got {n_steps!r}")
    ends = np.vstack([np.ravel(x_a), np.ravel(x_b)]).astype(np.float32)
    Z = model.transform(ends, **_conditions(model, y))
    t = np.linspace(0.0, 1.0, int(n_steps))[:, None]
    path = ((1.0 - t) * Z[0] + t * Z[1]).astype(np.float32)
    decoded = model.inverse_transform(path, **_conditions(model, y))
    rows = np.vstack([ends[:1], decoded, ends[1:]])
    shape = _image_shape(rows.shape[1], image_shape)
    fig, (ax,) = _axes(ax, 1, panel_size=(0.7 * len(rows) + 0.5, 1.6)
                       if shape is not None else (6.0, 4.0))
    _show_rows(ax, rows, shape, len(rows), *_value_range(model, rows), cmap)
    ax.set_title(f"x_a, {n_steps} steps from z_1(x_a) to z_1(x_b), x_b", fontsize="medium")
    return fig
