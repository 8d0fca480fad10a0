"""What a new user meets (issue 12): the posterior-collapse warning, progress
as plain lines in a log, hvae's own message for NaN and infinity, n_epochs=0,
and decode accepting encode's output."""
import io
import time
import warnings

import numpy as np
import pytest

import hvae
from hvae import HierarchicalVAE, PosteriorCollapseWarning
from hvae._chunks import ChunkedRows
from hvae._collapse import MAX_SAMPLE_ROWS, sample_rows
from hvae._training import ProgressBar
from hvae.datasets import load_digits


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits()
    return X, y


def evenly_spaced(n, m=MAX_SAMPLE_ROWS):
    return np.linspace(0, n - 1, min(n, m)).round().astype(int)


def fit_recording(vae, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae.fit(*args, **kwargs)
    return [w for w in caught if issubclass(w.category, PosteriorCollapseWarning)]


# ---- posterior collapse ---------------------------------------------------------------


def test_the_old_headline_collapses_and_fit_says_so(digits):
    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(32, 16), hidden_dims=(512, 256), likelihood="bernoulli",
                          n_epochs=20, random_state=0)
    caught = fit_recording(vae, X)
    assert vae.active_units_ == [0, 0]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # points at the user's call
    assert "posterior collapse after 20 epochs" in message
    assert "layer 1 (z_1): 0 of 32 units active" in message
    assert "layer 2 (z_2): 0 of 16 units active" in message
    for remedy in ("free_bits=0.5", "kl_warmup_epochs=10", "fewer latent dimensions",
                   "more epochs", "batch_size", "learning_rate"):
        assert remedy in message, remedy
    # The KL terms it quotes are the last epoch's.
    assert f"KL {vae.history_['kl'][-1][0]:.3f} nats" in message


def test_the_readme_headline_trains_without_a_warning(digits):
    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(8, 4), hidden_dims=(128,), likelihood="bernoulli",
                          n_epochs=50, batch_size=32, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PosteriorCollapseWarning)
        vae.fit(X)
    assert vae.active_units_ == [8, 4]
    # Counted as active_units counts, on at most 1000 evenly spaced rows.
    assert vae.active_units_ == vae.active_units(X[evenly_spaced(len(X))])


def test_a_collapsed_upper_layer_alone_is_named(digits):
    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(32, 16), hidden_dims=(64,), likelihood="bernoulli",
                          n_epochs=20, random_state=0, n_threads=1)
    caught = fit_recording(vae, X)
    assert vae.active_units_[0] > 0 and vae.active_units_[1] == 0
    message = str(caught[0].message)
    assert "layer 2 (z_2): 0 of 16" in message and "layer 1 (z_1)" not in message


def test_no_epoch_no_count_no_warning(digits):
    X, _ = digits
    small = dict(latent_dims=(8, 4), hidden_dims=(64,), likelihood="bernoulli",
                 random_state=0, n_threads=1)
    vae = HierarchicalVAE(n_epochs=0, **small)
    assert fit_recording(vae, X) == []
    # n_epochs=0 creates the model only.
    assert vae.active_units_ is None and vae.n_iter_ == 0 and vae.history_["elbo"] == []
    assert vae.model_.latent_dims == (8, 4)
    # Fewer than 100 minibatches (6 epochs of 12): untrained, not collapsed.
    few = HierarchicalVAE(n_epochs=6, beta=20.0, batch_size=128, **small)
    assert fit_recording(few, X[:1500]) == [] and few.active_units_ == [0, 0]
    collapsed = HierarchicalVAE(n_epochs=7, beta=20.0, warm_start=True, **small)
    assert len(fit_recording(collapsed, X)) == 1
    parameters = collapsed.model_.parameters.copy()
    collapsed.set_params(n_epochs=0)
    assert fit_recording(collapsed, X) == []  # nothing trained, nothing to say
    assert np.array_equal(collapsed.model_.parameters, parameters)


def test_partial_fit_warns_once_trained_enough(digits):
    X, _ = digits
    small = dict(latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli",
                 batch_size=16, random_state=0, n_threads=1)
    collapsing = HierarchicalVAE(beta=20.0, **small)
    healthy = HierarchicalVAE(**small)
    seen = []
    for _ in range(9):  # 9 passes of 113 minibatches: the 1000th is in the 9th
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collapsing.partial_fit(X)
            healthy.partial_fit(X)
        seen.append([type(w.message) for w in caught])
    assert sum(collapsing.history_["n_batches"][:8]) < 1000
    assert seen[:8] == [[]] * 8
    assert seen[8] == [PosteriorCollapseWarning]  # the collapsing model's only
    assert collapsing.active_units_ == [0, 0]
    assert "(partial_fit passes)" in str(caught[0].message)


def test_active_units_are_saved_and_pickled(digits, tmp_path):
    import pickle

    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(32,), likelihood="bernoulli",
                          n_epochs=3, random_state=0, n_threads=1).fit(X)
    vae.save(tmp_path / "m.npz")
    assert hvae.load(tmp_path / "m.npz").active_units_ == vae.active_units_
    assert pickle.loads(pickle.dumps(vae)).active_units_ == vae.active_units_


@pytest.mark.parametrize("value", [[5], [-1], [1.5], [1, 1], "4", True])
def test_a_file_with_impossible_active_units_is_refused(digits, tmp_path, value):
    import hashlib
    import json

    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(8,), likelihood="bernoulli",
                          n_epochs=1, random_state=0, n_threads=1).fit(X[:100])
    vae.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    metadata = json.loads(members.pop("metadata").tobytes().decode("utf-8"))
    assert metadata["attributes"]["active_units_"] == vae.active_units_
    metadata["attributes"]["active_units_"] = value
    body = {key: v for key, v in metadata.items() if key != "metadata_sha256"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    metadata["metadata_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    members["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), np.uint8)
    np.savez(tmp_path / "crafted.npz", **members)
    with pytest.raises(ValueError, match="active_units_ must be None or a list of 1 counts"):
        hvae.load(tmp_path / "crafted.npz")


def test_rows_read_in_chunks_are_sampled_in_evenly_spaced_runs(digits, tmp_path):
    X, _ = digits
    path = tmp_path / "X.npy"
    np.save(path, X)
    mapped = np.load(path, mmap_mode="r")
    sample, C = sample_rows(ChunkedRows(mapped, 0, len(X), 256))
    assert sample.shape == (MAX_SAMPLE_ROWS, 64) and C is None
    starts = [(len(X) - 125) * k // 7 for k in range(8)]
    expected = np.concatenate([X[s:s + 125] for s in starts])
    assert np.array_equal(sample, expected)
    vae = HierarchicalVAE(latent_dims=(8,), hidden_dims=(64,), likelihood="bernoulli",
                          n_epochs=3, random_state=0, n_threads=1, chunk_size=256).fit(mapped)
    assert vae.active_units_ == vae.active_units(expected)


# ---- progress ---------------------------------------------------------------------------


def test_progress_in_a_log_is_plain_lines_and_says_how_early_stopping_ended(digits, capsys):
    X, _ = digits
    vae = HierarchicalVAE(latent_dims=(8,), hidden_dims=(64,), likelihood="bernoulli",
                          n_epochs=500, verbose=1, early_stopping=True, n_iter_no_change=3,
                          learning_rate=1e-2, random_state=0, n_threads=1)
    started = time.perf_counter()
    vae.fit(X[:1400], validation_data=X[1400:])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert vae.n_iter_ < 500
    # The bar ends at the last epoch run, not the one after.
    assert lines[-2].startswith(f"epoch {vae.n_iter_}/500:"), lines[-2]
    assert lines[-1] == (
        f"early stopping after epoch {vae.n_iter_}: the validation ELBO did not improve by "
        f"more than tol=0.0001 for 3 epochs; restored the parameters of epoch "
        f"{vae.best_epoch_ + 1} (val_elbo {vae.history_['val_elbo'][vae.best_epoch_]:.3f}; "
        f"best_epoch_={vae.best_epoch_})")
    # The first line, at most one per 5 s, the last, the note: all bar lines
    # but the note.
    assert len(lines) <= 3 + elapsed / 5, lines
    assert all(line.startswith("epoch ") for line in lines[:-1])


def test_a_terminal_gets_the_redrawn_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, plain in ((Terminal(), False), (io.StringIO(), True)):
        bar = ProgressBar(3, 10, 1, stream=stream)
        for epoch in range(2):
            bar.update(10)
            bar.report(epoch, {"elbo": -1.0}, None)
        bar.close(2)
        text = stream.getvalue()
        assert ("\r" not in text) == plain
        assert text.replace("\r", "\n").strip().splitlines()[-1].startswith("epoch 2/3:")


# ---- NaN and infinity -------------------------------------------------------------------


def test_nan_and_inf_in_x_get_hvae_s_own_message(digits):
    X, _ = digits
    X = X.copy()
    X[[3, 17, 40], 5] = np.nan
    X[100, 7] = np.inf
    with pytest.raises(ValueError) as info:
        HierarchicalVAE(n_epochs=1).fit(X)
    message = str(info.value)
    assert message.startswith("X contains NaN (3 values) and infinity (1 value")
    assert "in 4 of 1797 rows (rows 3, 17, 40, 100; columns 5, 7)" in message
    assert "SimpleImputer" in message and "drop those rows" in message
    assert "HistGradientBoosting" not in message
    X[200:220, 9] = np.nan
    with pytest.raises(ValueError, match=r"rows 3, 17, 40, 100, 200, \.\.\. \(24 rows\)"):
        HierarchicalVAE(n_epochs=1).fit(X)
    with pytest.raises(ValueError, match=r"^X contains infinity \(1 value; values beyond "
                                         r"float32's range"):
        HierarchicalVAE(n_epochs=1).fit(np.array([[1e39, 0.0], [0.0, 1.0]]))


def test_nan_in_validation_data_y_and_later_calls(digits):
    X, y = digits
    bad = X[:200].copy()
    bad[7, 0] = np.nan
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), n_epochs=1, n_threads=1)
    with pytest.raises(ValueError, match=r"^validation_data: validation_data contains NaN "
                                         r"\(1 value\) in 1 of 200 rows \(row 7; column 0\)"):
        vae.fit(X[200:], validation_data=bad)
    labels = y[200:].astype(float)
    labels[5] = np.nan
    with pytest.raises(ValueError, match=r"^y contains NaN \(1 value\) in 1 of 1597 rows "
                                         r"\(row 5\)\. .*drop those rows from X and y"):
        HierarchicalVAE(conditional=True, n_epochs=1).fit(X[200:], labels)
    conditions = np.ones((1597, 2))
    conditions[9, 1] = -np.inf
    with pytest.raises(ValueError, match=r"^y contains infinity .* \(row 9; column 1\)"):
        HierarchicalVAE(conditional=True, n_epochs=1).fit(X[200:], conditions)
    vae.fit(X)
    with pytest.raises(ValueError, match=r"^X contains NaN \(1 value\) in 1 of 200 rows"):
        vae.transform(bad)


def test_nan_in_a_chunk_is_located_in_the_file(digits, tmp_path):
    X, _ = digits
    X = X.copy()
    X[700, 3] = np.nan
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"^rows 640:960 of X contain NaN or infinity .*: NaN "
                                         r"\(1 value\) in 1 of 320 rows \(row 700; column 3\)"):
        HierarchicalVAE(n_epochs=1, chunk_size=320).fit(mapped)


# ---- decode(encode(X)) --------------------------------------------------------------------


def test_decode_accepts_encode_s_output(digits):
    X, _ = digits
    model = hvae.Model(64, latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli",
                       seed=0)
    layers = model.encode(X)
    assert np.array_equal(model.decode(layers), model.decode(layers[0][0]))
    with pytest.raises(ValueError, match=r"encode's output, a list of 2 \(mu, logvar\) pairs"):
        model.decode(layers[:1])
    assert model.decode([[0.0] * 8]).shape == (1, 64)  # a list of rows is still Z

    vae = HierarchicalVAE(latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli",
                          n_epochs=2, random_state=0, n_threads=1).fit(X)
    assert np.array_equal(vae.inverse_transform(vae.encode(X)), vae.reconstruct(X))
    with pytest.raises(ValueError, match=r"encode's output, a list of 2 \(mu, logvar\) pairs"):
        vae.inverse_transform(vae.encode(X)[1:])
