"""HierarchicalVAE.fit: progress bar, callbacks, validation and early stopping."""
import math
import tracemalloc

import numpy as np
import pytest

from hvae import HierarchicalVAE
from hvae.datasets import load_digits


@pytest.fixture(scope="module")
def digits_split():
    X, _ = load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:1400]], X[order[1400:]]


def small_vae(**params):
    defaults = dict(latent_dims=(8,), hidden_dims=(64,), likelihood="bernoulli",
                    n_epochs=3, batch_size=64, random_state=0, n_threads=1)
    defaults.update(params)
    return HierarchicalVAE(**defaults)


# ---- progress --------------------------------------------------------------------


def test_verbose_0_is_silent(digits_split, capsys):
    small_vae(verbose=0).fit(digits_split[0], validation_data=digits_split[1])
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_verbose_1_shows_a_progress_bar_with_the_elbo(digits_split, capsys):
    vae = small_vae(verbose=1).fit(digits_split[0], validation_data=digits_split[1])
    out, err = capsys.readouterr()
    assert out == ""
    # tqdm writes to stderr; the final state shows every row and the last ELBOs.
    final = err.strip().split("\r")[-1]
    assert "100%" in final and "epoch 3/3" in final, final
    assert f"elbo={vae.history_['elbo'][-1]:.3f}" in final
    assert f"val_elbo={vae.history_['val_elbo'][-1]:.3f}" in final
    assert "4.20k/4.20k" in final  # 3 epochs of 1400 rows


def test_verbose_2_also_prints_one_line_per_epoch(digits_split, capsys):
    small_vae(verbose=2).fit(digits_split[0])
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("elbo" in line and "kl [" in line for line in lines)


# ---- callbacks -------------------------------------------------------------------


def test_callbacks_see_every_epoch_and_the_history(digits_split):
    X_train, X_val = digits_split
    calls = []

    def log(epoch, history):
        calls.append((epoch, len(history["elbo"]), len(history["val_elbo"]),
                      history["elbo"][epoch]))

    vae = small_vae(callbacks=[log], warm_start=True)
    vae.fit(X_train, validation_data=X_val).fit(X_train, validation_data=X_val)
    # Epochs are numbered across warm-started fits, as indices into history_.
    assert [c[0] for c in calls] == [0, 1, 2, 3, 4, 5]
    assert [c[1] for c in calls] == [1, 2, 3, 4, 5, 6]
    assert [c[2] for c in calls] == [1, 2, 3, 4, 5, 6]
    assert [c[3] for c in calls] == vae.history_["elbo"]


def test_a_single_callable_is_accepted(digits_split):
    epochs = []
    small_vae(callbacks=lambda epoch, history: epochs.append(epoch)).fit(digits_split[0])
    assert epochs == [0, 1, 2]


def test_returning_false_stops_cleanly_after_that_epoch(digits_split):
    seen_by_second = []
    vae = small_vae(n_epochs=10, callbacks=[
        lambda epoch, history: epoch < 3,          # False after epoch index 3
        lambda epoch, history: seen_by_second.append(epoch),
    ])
    assert vae.fit(digits_split[0]) is vae
    assert vae.n_iter_ == 4
    assert all(len(values) == 4 for values in vae.history_.values())
    assert seen_by_second == [0, 1, 2, 3]  # every callback runs on the last epoch
    # None (and any value but False) continues.
    assert small_vae(callbacks=lambda e, h: None).fit(digits_split[0]).n_iter_ == 3


def test_callbacks_may_use_the_model(digits_split):
    X_train, X_val = digits_split
    scores = []
    vae = small_vae()
    vae.set_params(callbacks=lambda epoch, history: scores.append(vae.score(X_val)))
    vae.fit(X_train, validation_data=X_val)
    # The validation ELBO is exactly score() at the end of each epoch.
    assert scores == vae.history_["val_elbo"]


def test_an_exception_in_a_callback_propagates_and_keeps_history(digits_split):
    def fail(epoch, history):
        if epoch == 1:
            raise RuntimeError("logger down")

    vae = small_vae(n_epochs=5, callbacks=fail)
    with pytest.raises(RuntimeError, match="logger down"):
        vae.fit(digits_split[0])
    assert vae.n_iter_ == 2 and len(vae.history_["elbo"]) == 2


@pytest.mark.parametrize("callbacks", [3, [print, "x"], "not callable"])
def test_bad_callbacks_raise_before_any_work(callbacks):
    vae = HierarchicalVAE(callbacks=callbacks)
    with pytest.raises(ValueError, match="callbacks"):
        vae.fit(np.random.default_rng(0).random((10, 3)))
    assert not hasattr(vae, "model_")


# ---- validation ------------------------------------------------------------------


def test_validation_history_terms(digits_split):
    X_train, X_val = digits_split
    vae = small_vae(latent_dims=(8, 4)).fit(X_train, validation_data=X_val)
    history = vae.history_
    assert {"val_elbo", "val_reconstruction", "val_kl"} <= set(history)
    assert len(history["val_elbo"]) == 3
    assert np.array(history["val_kl"]).shape == (3, 2)
    np.testing.assert_allclose(
        np.array(history["val_reconstruction"]) - np.sum(history["val_kl"], axis=1),
        history["val_elbo"], rtol=1e-9)
    assert history["val_elbo"][-1] == vae.score(X_val)


def test_no_validation_keys_without_validation(digits_split):
    vae = small_vae().fit(digits_split[0])
    assert not any(key.startswith("val_") for key in vae.history_)


def test_warm_start_pads_epochs_without_validation_with_nan(digits_split):
    X_train, X_val = digits_split
    vae = small_vae(n_epochs=2, warm_start=True).fit(X_train)
    vae.fit(X_train, validation_data=X_val)
    vae.fit(X_train)
    val = vae.history_["val_elbo"]
    assert len(val) == 6
    assert [math.isnan(v) for v in val] == [True, True, False, False, True, True]
    assert all(math.isnan(k) for k in vae.history_["val_kl"][0])


def test_validation_fraction_holds_out_rows():
    X, _ = load_digits()
    X = X[:100]
    vae = small_vae(batch_size=1, n_epochs=1, validation_fraction=0.25).fit(X)
    assert vae.history_["n_batches"] == [75]      # 100 - ceil(0.25 * 100)
    assert len(vae.history_["val_elbo"]) == 1
    # With an int random_state, every fit holds out the same rows (the
    # validation ELBO of the same parameters is then the same).
    b = small_vae(n_epochs=1, validation_fraction=0.3, random_state=1).fit(X)
    c = small_vae(n_epochs=1, validation_fraction=0.3, random_state=1).fit(X)
    assert b.history_["val_elbo"] == c.history_["val_elbo"]


def test_validation_data_makes_no_copy_of_X():
    rng = np.random.default_rng(0)
    X = rng.random((20000, 50), dtype=np.float32)  # 4 MB
    X_val = rng.random((2000, 50), dtype=np.float32)
    vae = HierarchicalVAE(latent_dims=(4,), hidden_dims=(16,), n_epochs=2, batch_size=256,
                          random_state=0, n_threads=1)
    tracemalloc.start()
    vae.fit(X, validation_data=X_val)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < X.nbytes / 4, peak


@pytest.mark.parametrize("params, fit_kwargs, message", [
    ({"validation_fraction": 0.0}, {}, "validation_fraction"),
    ({"validation_fraction": 1.0}, {}, "validation_fraction"),
    ({"validation_fraction": "10%"}, {}, "validation_fraction"),
    ({"validation_fraction": 0.99}, {}, "at least one of each"),
    ({"validation_fraction": 0.2}, {"validation_data": np.zeros((3, 4))}, "not both"),
    ({}, {"validation_data": np.zeros((3, 5))}, "validation_data.*features"),
    ({}, {"validation_data": np.full((3, 4), 2.0)}, r"validation_data.*outside \[0, 1\]"),
    ({}, {"validation_data": np.full((3, 4), np.nan)}, "validation_data.*NaN"),
    ({"early_stopping": "yes"}, {}, "early_stopping"),
    ({"n_iter_no_change": 0}, {}, "n_iter_no_change"),
    ({"tol": -1.0}, {}, "tol"),
])
def test_bad_validation_settings_raise_before_any_work(params, fit_kwargs, message):
    X = np.random.default_rng(0).random((10, 4))
    vae = HierarchicalVAE(likelihood="bernoulli", **params)
    with pytest.raises(ValueError, match=message):
        vae.fit(X, **fit_kwargs)
    assert not hasattr(vae, "model_")


# ---- early stopping --------------------------------------------------------------


def test_early_stopping_restores_the_best_parameters(digits_split):
    X_train, X_val = digits_split
    # 100 training rows and a wide model overfit: the validation ELBO peaks
    # and then falls.
    snapshots = []
    vae = small_vae(hidden_dims=(256,), learning_rate=3e-3, batch_size=20, n_epochs=300,
                    early_stopping=True, n_iter_no_change=5, tol=0.0,
                    callbacks=lambda e, h: snapshots.append(vae.model_.parameters.copy()))
    vae.fit(X_train[:100], validation_data=X_val)
    val = np.array(vae.history_["val_elbo"])
    best = int(np.argmax(val))
    assert vae.n_iter_ < 300, "the validation ELBO should have stopped improving"
    assert vae.best_epoch_ == best
    assert vae.n_iter_ == best + 5 + 1 == len(val)
    np.testing.assert_array_equal(vae.model_.parameters, snapshots[best])
    assert vae.score(X_val) == val[best]
    # Only the parameters go back: the optimizer state is the last epoch's.
    assert vae.model_.optimizer_steps == vae.n_iter_ * 5


def test_early_stopping_counts_epochs_without_improvement(digits_split):
    X_train, X_val = digits_split
    # tol larger than any change: epoch 0 is the best, then 3 stale epochs.
    vae = small_vae(n_epochs=20, early_stopping=True, n_iter_no_change=3, tol=1e9)
    vae.fit(X_train, validation_data=X_val)
    assert vae.n_iter_ == 4 and vae.best_epoch_ == 0
    assert vae.score(X_val) == vae.history_["val_elbo"][0]


def test_early_stopping_without_validation_data_holds_out_a_tenth():
    X, _ = load_digits()
    vae = small_vae(batch_size=1, n_epochs=1, early_stopping=True).fit(X[:100])
    assert vae.history_["n_batches"] == [90]
    assert vae.best_epoch_ == 0


def test_early_stopping_restores_the_best_when_interrupted(digits_split):
    X_train, X_val = digits_split
    snapshots = []

    def interrupt(epoch, history):
        snapshots.append(vae.model_.parameters.copy())
        if epoch == 3:
            raise KeyboardInterrupt

    vae = small_vae(n_epochs=10, early_stopping=True, tol=1e9, callbacks=interrupt)
    with pytest.raises(KeyboardInterrupt):
        vae.fit(X_train, validation_data=X_val)
    assert vae.n_iter_ == 4 and len(vae.history_["val_elbo"]) == 4
    assert vae.best_epoch_ == 0
    np.testing.assert_array_equal(vae.model_.parameters, snapshots[0])


def test_without_early_stopping_best_epoch_is_none(digits_split):
    vae = small_vae().fit(digits_split[0], validation_data=digits_split[1])
    assert vae.best_epoch_ is None
