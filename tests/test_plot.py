"""hvae.plot: every function returns a Figure with the expected axes and data."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hvae import HierarchicalVAE  # noqa: E402
from hvae.datasets import load_digits  # noqa: E402
from hvae.plot import (plot_history, plot_interpolation, plot_latent,  # noqa: E402
                       plot_reconstructions, plot_samples)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def vae(digits):
    X, _ = digits
    return HierarchicalVAE(latent_dims=(8, 2), hidden_dims=(64,), likelihood="bernoulli",
                           n_epochs=4, batch_size=64, random_state=0, n_threads=1,
                           early_stopping=True).fit(X)


@pytest.fixture(scope="module")
def plain_vae(digits):
    X, _ = digits
    return HierarchicalVAE(latent_dims=(3,), hidden_dims=(32,), likelihood="bernoulli",
                           n_epochs=2, random_state=0, n_threads=1).fit(X)


def line_data(ax):
    return {line.get_label(): line.get_ydata() for line in ax.get_lines()}


# ---- plot_history ----------------------------------------------------------------


def test_plot_history_draws_the_history_in_nats(vae):
    fig = plot_history(vae)
    assert isinstance(fig, matplotlib.figure.Figure)
    elbo_ax, rec_ax, kl_ax = fig.axes
    for ax in fig.axes:
        assert "nats" in ax.get_ylabel()
        assert ax.get_xlabel() == "epoch"
    history = vae.history_
    epochs = np.arange(1, vae.n_iter_ + 1)
    lines = line_data(elbo_ax)
    np.testing.assert_array_equal(lines["train"], history["elbo"])
    np.testing.assert_array_equal(lines["validation"], history["val_elbo"])
    np.testing.assert_array_equal(elbo_ax.get_lines()[0].get_xdata(), epochs)
    best = [line for line in elbo_ax.get_lines() if line.get_label() == "best epoch"]
    assert best and best[0].get_xdata()[0] == vae.best_epoch_ + 1
    lines = line_data(rec_ax)
    np.testing.assert_array_equal(lines["train"], history["reconstruction"])
    np.testing.assert_array_equal(lines["validation"], history["val_reconstruction"])
    lines = line_data(kl_ax)
    kl, val_kl = np.array(history["kl"]), np.array(history["val_kl"])
    for layer in range(2):
        np.testing.assert_array_equal(lines[f"layer {layer + 1}"], kl[:, layer])
        np.testing.assert_array_equal(lines[f"layer {layer + 1} (validation)"],
                                      val_kl[:, layer])


def test_plot_history_without_validation(plain_vae):
    fig = plot_history(plain_vae)
    elbo_ax, rec_ax, kl_ax = fig.axes
    assert list(line_data(elbo_ax)) == ["train"]
    assert list(line_data(kl_ax)) == ["layer 1"]


def test_plot_history_into_given_axes(vae):
    fig, axes = plt.subplots(2, 3)
    assert plot_history(vae, ax=axes[1]) is fig
    assert [len(ax.get_lines()) for ax in axes[1]] == [3, 2, 4]
    assert all(len(ax.get_lines()) == 0 for ax in axes[0])
    fig, ax = plt.subplots()
    assert plot_history(vae, ax=ax) is fig           # one Axes: the ELBO panel
    assert ax.get_ylabel() == "ELBO (nats)" and len(fig.axes) == 1
    with pytest.raises(ValueError, match="3 panels"):
        plot_history(vae, ax=plt.subplots(1, 2)[1])


# ---- images ----------------------------------------------------------------------


def grid_image(fig):
    (ax,) = fig.axes
    (image,) = ax.get_images()
    return np.ma.filled(image.get_array().astype(float), np.nan)


def test_plot_samples_is_an_image_grid(vae):
    fig = plot_samples(vae, 10, n_cols=4)
    grid = grid_image(fig)
    # 3 rows and 4 columns of 8x8 images with one pixel between them.
    assert grid.shape == (3 * 9 - 1, 4 * 9 - 1)
    expected = vae.sample(10, random_state=0)
    np.testing.assert_array_equal(grid[:8, :8], expected[0].reshape(8, 8))
    np.testing.assert_array_equal(grid[9:17, 9:17], expected[5].reshape(8, 8))
    assert np.all(np.isnan(grid[18:, 2 * 9:]))         # two empty cells at the end
    assert np.all(np.isnan(grid[8, :]))                 # the gap between rows


def test_plot_samples_image_shape_and_heatmap(vae):
    grid = grid_image(plot_samples(vae, 4, image_shape=(4, 16), n_cols=2))
    assert grid.shape == (2 * 5 - 1, 2 * 17 - 1)
    with pytest.raises(ValueError, match="does not hold 64"):
        plot_samples(vae, 4, image_shape=(5, 5))
    rng = np.random.default_rng(0)
    tabular = HierarchicalVAE(latent_dims=(2,), hidden_dims=(8,), n_epochs=1,
                              random_state=0).fit(rng.normal(size=(50, 5)))
    fig = plot_samples(tabular, 6)
    heatmap = fig.axes[0].get_images()[0].get_array()
    assert heatmap.shape == (6, 5)
    assert fig.axes[0].get_xlabel() == "feature"


def test_plot_reconstructions_pairs_data_and_reconstructions(vae, digits):
    X, _ = digits
    grid = grid_image(plot_reconstructions(vae, X, n=5))
    assert grid.shape == (2 * 9 - 1, 5 * 9 - 1)
    reconstructions = vae.reconstruct(X[:5])
    for i in range(5):
        np.testing.assert_array_equal(grid[:8, 9 * i:9 * i + 8], X[i].reshape(8, 8))
        np.testing.assert_array_equal(grid[9:, 9 * i:9 * i + 8],
                                      reconstructions[i].reshape(8, 8))
    # Wrapped: 7 images 3 wide make 3 pairs of rows.
    assert grid_image(plot_reconstructions(vae, X, n=7, n_cols=3)).shape == (6 * 9 - 1,
                                                                             3 * 9 - 1)


def test_plot_interpolation_row(vae, digits):
    X, _ = digits
    grid = grid_image(plot_interpolation(vae, X[0], X[1], n_steps=5))
    assert grid.shape == (8, 7 * 9 - 1)                 # x_a, 5 steps, x_b
    np.testing.assert_array_equal(grid[:, :8], X[0].reshape(8, 8))
    np.testing.assert_array_equal(grid[:, 6 * 9:], X[1].reshape(8, 8))
    z = vae.transform(X[:2])
    np.testing.assert_allclose(grid[:, 9:17], vae.inverse_transform(z[:1])[0].reshape(8, 8),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="n_steps"):
        plot_interpolation(vae, X[0], X[1], n_steps=1)


# ---- latent space ----------------------------------------------------------------


def test_plot_latent_one_panel_per_layer(vae, digits):
    X, y = digits
    fig = plot_latent(vae, X[:300], y[:300])
    assert len(fig.axes) == 2
    wide, flat = fig.axes
    points = wide.collections[0].get_offsets()
    assert points.shape == (300, 2)
    assert "PC 1 of z_1" in wide.get_xlabel()
    # Layer 2 is 2-D: drawn as is.
    np.testing.assert_allclose(flat.collections[0].get_offsets(), vae.encode(X[:300])[1][0],
                               rtol=1e-6)
    assert flat.get_xlabel() == "z_2[0]" and flat.get_ylabel() == "z_2[1]"
    # The PCA keeps the spread of the 8-D means in two directions.
    mu = vae.encode(X[:300])[0][0].astype(float)
    assert np.var(points[:, 0]) <= np.sum(np.var(mu, axis=0)) + 1e-9
    legend = flat.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(k) for k in range(10)]
    colours = flat.collections[0].get_array()
    np.testing.assert_array_equal(colours, y[:300])


def test_plot_latent_layers_axes_and_values(vae, plain_vae, digits):
    X, y = digits
    fig, ax = plt.subplots()
    assert plot_latent(vae, X[:50], ax=ax) is fig                     # first layer only
    assert ax.collections[0].get_offsets().shape == (50, 2)
    assert len(plot_latent(vae, X[:50], layers=2).axes) == 1
    with pytest.raises(ValueError, match="layers"):
        plot_latent(vae, X[:50], layers=3)
    # Continuous values get a colour bar, not a legend.
    fig = plot_latent(plain_vae, X[:50], np.linspace(0, 1, 50))
    assert fig.axes[0].get_legend() is None and len(fig.axes) == 2
    with pytest.raises(ValueError, match="y has"):
        plot_latent(plain_vae, X[:50], y[:10])


def test_plot_latent_of_a_one_dimensional_layer(digits):
    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(1,), hidden_dims=(16,), likelihood="bernoulli",
                          n_epochs=1, random_state=0).fit(X)
    offsets = plot_latent(vae, X[:20]).axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], vae.transform(X[:20])[:, 0], rtol=1e-6)
    assert np.all(offsets[:, 1] == 0)


def test_plots_need_a_fitted_model():
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        plot_history(HierarchicalVAE())
    with pytest.raises(NotFittedError):
        plot_samples(HierarchicalVAE())


@pytest.mark.parametrize("draw", [
    lambda vae, X, y: plot_history(vae),
    lambda vae, X, y: plot_samples(vae, 4),
    lambda vae, X, y: plot_reconstructions(vae, X, n=3),
    lambda vae, X, y: plot_latent(vae, X[:30], y[:30]),
    lambda vae, X, y: plot_interpolation(vae, X[0], X[1]),
], ids=["history", "samples", "reconstructions", "latent", "interpolation"])
def test_every_plot_returns_its_figure(vae, digits, draw):
    X, y = digits
    fig = draw(vae, X, y)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes and all(ax.figure is fig for ax in fig.axes)
    # Drawn through pyplot, so that Jupyter and plt.show() display it.
    assert fig.number in plt.get_fignums()
