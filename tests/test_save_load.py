"""HierarchicalVAE.save and hvae.load: the no-pickle model file, and what it refuses."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import hvae
from hvae import HierarchicalVAE
from hvae.datasets import load_digits


@pytest.fixture(scope="module")
def digits_split():
    X, _ = load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:1400]], X[order[1400:]]


def small_vae(**params):
    defaults = dict(latent_dims=(8, 4), hidden_dims=(64,), likelihood="bernoulli",
                    n_epochs=3, batch_size=64, random_state=0, n_threads=1)
    defaults.update(params)
    return HierarchicalVAE(**defaults)


@pytest.fixture(scope="module")
def fitted(digits_split):
    X_train, X_val = digits_split
    return small_vae(early_stopping=True).fit(X_train, validation_data=X_val)


@pytest.fixture
def saved(fitted, tmp_path):
    path = tmp_path / "vae.npz"
    fitted.save(path)
    return path


def assert_same_outputs(a, b, X):
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(a.reconstruct(X), b.reconstruct(X))
    np.testing.assert_array_equal(a.sample(9, random_state=4), b.sample(9, random_state=4))
    for (mu_a, lv_a), (mu_b, lv_b) in zip(a.encode(X), b.encode(X)):
        np.testing.assert_array_equal(mu_a, mu_b)
        np.testing.assert_array_equal(lv_a, lv_b)


# ---- round trips -----------------------------------------------------------------


def test_save_then_load_gives_identical_outputs(fitted, saved, digits_split):
    loaded = hvae.load(saved)
    assert type(loaded) is HierarchicalVAE
    assert loaded.get_params() == fitted.get_params()
    assert isinstance(loaded.latent_dims, tuple) and isinstance(loaded.hidden_dims, tuple)
    assert loaded.history_ == fitted.history_
    assert loaded.n_iter_ == fitted.n_iter_ and loaded.best_epoch_ == fitted.best_epoch_
    assert loaded.n_features_in_ == 64
    np.testing.assert_array_equal(loaded.model_.parameters, fitted.model_.parameters)
    assert loaded.model_.rng_state == fitted.model_.rng_state
    assert_same_outputs(loaded, fitted, digits_split[1])


@pytest.mark.parametrize("params", [
    dict(),                                                    # Adam
    dict(optimizer="sgd", likelihood="gaussian", latent_dims=(3,), decoder_variance="unit"),
    dict(n_epochs=0),                                          # no optimizer state yet
])
def test_training_continues_identically_after_loading(params, digits_split, tmp_path):
    X_train, X_val = digits_split
    original = small_vae(warm_start=True, **params).fit(X_train)
    original.save(tmp_path / "m.npz")
    loaded = hvae.load(tmp_path / "m.npz")
    original.set_params(n_epochs=2)
    loaded.set_params(n_epochs=2)
    original.fit(X_train)
    loaded.fit(X_train)
    np.testing.assert_array_equal(loaded.model_.parameters, original.model_.parameters)
    assert loaded.history_["elbo"][-2:] == original.history_["elbo"][-2:]
    assert_same_outputs(loaded, original, X_val)


def test_ladder_and_conditional_models_round_trip(tmp_path):
    X, y = load_digits()
    ladder = small_vae(inference="ladder").fit(X)
    ladder.save(tmp_path / "ladder.npz")
    assert_same_outputs(hvae.load(tmp_path / "ladder.npz"), ladder, X[:50])
    conditional = small_vae(conditional=True).fit(X, y)
    conditional.save(tmp_path / "conditional.npz")
    loaded = hvae.load(tmp_path / "conditional.npz")
    np.testing.assert_array_equal(loaded.classes_, conditional.classes_)
    np.testing.assert_array_equal(loaded.transform(X[:50], y[:50]),
                                  conditional.transform(X[:50], y[:50]))
    np.testing.assert_array_equal(loaded.sample(6, random_state=0, y=3),
                                  conditional.sample(6, random_state=0, y=3))


def test_feature_names_and_nan_history_round_trip(digits_split, tmp_path):
    X_train, X_val = digits_split
    vae = small_vae(warm_start=True, n_epochs=1).fit(X_train)
    vae.fit(X_train, validation_data=X_val)       # val_elbo: [nan, value]
    vae.feature_names_in_ = np.array([f"pixel{i}" for i in range(64)], dtype=object)
    vae.save(tmp_path / "m.npz")
    loaded = hvae.load(tmp_path / "m.npz")
    assert np.isnan(loaded.history_["val_elbo"][0])
    assert loaded.history_["val_elbo"][1] == vae.history_["val_elbo"][1]
    assert loaded.feature_names_in_.dtype == object
    assert list(loaded.feature_names_in_) == list(vae.feature_names_in_)


def test_the_file_is_a_plain_npz_with_json_metadata(fitted, saved):
    with np.load(saved, allow_pickle=False) as data:
        assert set(data.files) == {"metadata", "parameters", "optimizer.m", "optimizer.v"}
        metadata = json.loads(data["metadata"].tobytes().decode("utf-8"))
        assert data["parameters"].dtype == np.dtype("<f4")
    assert metadata["format"] == "hvae" and metadata["format_version"] == 1
    assert metadata["hvae_version"] == hvae.__version__
    assert metadata["model"]["n_features"] == 64
    assert metadata["layout"] == [[name, list(view.shape)]
                                  for name, view in fitted.model_.named_parameters()]
    assert metadata["attributes"]["history_"]["elbo"] == fitted.history_["elbo"]
    assert len(metadata["arrays"]["parameters"]["sha256"]) == 64


def test_save_writes_exactly_the_path_and_replaces_it(fitted, tmp_path):
    path = tmp_path / "model"                      # no suffix added
    fitted.save(str(path))
    fitted.save(path)                              # replaces
    assert sorted(os.listdir(tmp_path)) == ["model"]
    hvae.load(str(path))


def test_unsaveable_params_warn_and_load_as_none(digits_split, tmp_path):
    vae = small_vae(n_epochs=1, random_state=np.random.RandomState(0),
                    callbacks=[lambda epoch, history: None]).fit(digits_split[0])
    with pytest.warns(UserWarning, match="random_state, callbacks|callbacks, random_state"):
        vae.save(tmp_path / "m.npz")
    loaded = hvae.load(tmp_path / "m.npz")
    assert loaded.callbacks is None and loaded.random_state is None
    np.testing.assert_array_equal(loaded.transform(digits_split[1]),
                                  vae.transform(digits_split[1]))


def test_save_needs_a_fitted_estimator(tmp_path):
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        small_vae().save(tmp_path / "m.npz")
    assert not os.listdir(tmp_path)


def test_pickle_keeps_working(fitted, digits_split):
    restored = pickle.loads(pickle.dumps(fitted))
    assert_same_outputs(restored, fitted, digits_split[1])


# ---- refusals --------------------------------------------------------------------


def read_members(path):
    with np.load(path, allow_pickle=False) as data:
        members = {name: data[name] for name in data.files}
    metadata = json.loads(members.pop("metadata").tobytes().decode("utf-8"))
    return metadata, members


def write_members(path, metadata, members):
    text = json.dumps(metadata).encode("utf-8")
    with open(path, "wb") as file:
        np.savez(file, metadata=np.frombuffer(text, dtype=np.uint8), **members)


def refuses(path, message):
    with pytest.raises(ValueError, match=message) as info:
        hvae.load(path)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("keep", [0, 10, 100, 0.25, 0.5, 0.9, -1])
def test_refuses_a_truncated_file(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else (
        len(data) - 1 if keep == -1 else int(keep * len(data)))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:n])
    refuses(cut, "damaged|not an hvae|truncated")


def test_refuses_a_flipped_byte_in_the_parameters(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    start = data.index(b"parameters.npy")
    # A byte well inside the parameter data of the first member.
    data[start + 2000] ^= 0x40
    altered = tmp_path / "altered.npz"
    altered.write_bytes(bytes(data))
    refuses(altered, "CRC|damaged|checksum")


def test_refuses_altered_parameters_with_a_valid_zip(saved, tmp_path):
    metadata, members = read_members(saved)
    members["parameters"] = members["parameters"].copy()
    members["parameters"][10] += 1e-3        # re-saved: CRCs are fine, the SHA-256 is not
    path = tmp_path / "altered.npz"
    write_members(path, metadata, members)
    refuses(path, "SHA-256 checksum")


def test_refuses_non_finite_parameters_even_with_a_matching_checksum(saved, tmp_path):
    import hashlib
    metadata, members = read_members(saved)
    members["parameters"] = members["parameters"].copy()
    members["parameters"][3] = np.nan
    metadata["arrays"]["parameters"]["sha256"] = hashlib.sha256(
        members["parameters"].tobytes()).hexdigest()
    path = tmp_path / "nan.npz"
    write_members(path, metadata, members)
    refuses(path, "NaN or infinite")


def edit_metadata(saved, tmp_path, edit):
    metadata, members = read_members(saved)
    edit(metadata, members)
    path = tmp_path / "edited.npz"
    write_members(path, metadata, members)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda m, a: m.update(format_version=2), "format version 2.*reads version 1.*upgrade"),
    (lambda m, a: m.update(format_version="1"), "format version '1'"),
    (lambda m, a: m.update(format="other"), "not an hvae model file"),
    (lambda m, a: m.pop("layout"), r"lacks \['layout'\]"),
    (lambda m, a: m.pop("attributes"), r"lacks \['attributes'\]"),
    (lambda m, a: m["attributes"].pop("history_"), "history_"),
    (lambda m, a: a.pop("optimizer.m"), "differ from the metadata's arrays"),
    (lambda m, a: m["layout"][0][1].__setitem__(1, 65), "layout mismatch"),
    (lambda m, a: m["model"]["latent_dims"]["__tuple__"].__setitem__(1, 5), "layout mismatch"),
    (lambda m, a: m["model"].update(likelihood="gaussian"), "layout mismatch"),
    (lambda m, a: m["model"].update(activation="swish"), "invalid model architecture"),
    (lambda m, a: m["model"].update(hidden_dims={"__tuple__": [10**9]}), "impossible"),
    (lambda m, a: m["model"].update(hidden_dims={"__tuple__": [5000, 5000, 5000]}),
     "implausibly large"),
    (lambda m, a: m["model"].update(n_features=63), "layout mismatch"),
    (lambda m, a: m["model"].update(depth=3), "does not know"),
    (lambda m, a: m["params"].update(depth=3), "parameters this hvae.*does not know"),
    (lambda m, a: m["arrays"]["parameters"].update(shape=[10**12]), "the metadata says"),
    (lambda m, a: m["arrays"]["optimizer.v"].update(dtype="<f8"), "the metadata says"),
    (lambda m, a: m["state"]["optimizer"].update(kind="rmsprop"), "invalid model state"),
    (lambda m, a: m["state"].update(rng_state=[1, 2]), "invalid model state"),
    (lambda m, a: m.update(estimator="PCA"), "not a HierarchicalVAE"),
    (lambda m, a: m["state"].update(parameters={"__array__": "nope"}), "missing array"),
])
def test_refuses_inconsistent_metadata(saved, tmp_path, edit, message):
    refuses(edit_metadata(saved, tmp_path, edit), message)


def test_refuses_files_that_are_not_hvae_models(tmp_path, fitted):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(1000))
    refuses(junk, "damaged or not an hvae model file")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    refuses(empty, "damaged or not an hvae model file")
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps(fitted))
    refuses(pickled, "damaged or not an hvae model file")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    refuses(other, "no metadata")
    objects = tmp_path / "objects.npz"
    with zipfile.ZipFile(objects, "w") as archive:
        archive.writestr("metadata.npy", pickle.dumps([1]))
    refuses(objects, "not a .npy array")
    with pytest.raises(FileNotFoundError):
        hvae.load(tmp_path / "missing.npz")


def test_refuses_an_array_larger_than_declared_before_reading_it(saved, tmp_path):
    # A deflated member whose header declares a huge uncompressed size.
    metadata, members = read_members(saved)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.npy", _npy_bytes(np.frombuffer(
            json.dumps(metadata).encode(), dtype=np.uint8)))
        big = np.zeros(4 * 10**6, dtype=np.float32)       # 16 MB, compresses to ~16 kB
        archive.writestr("parameters.npy", _npy_bytes(big))
        for name in ("optimizer.m", "optimizer.v"):
            archive.writestr(f"{name}.npy", _npy_bytes(members[name]))
    # Refused before the 16 MB are read: from the .npy header (or, stricter, for
    # being compressed at all).
    refuses(bomb, r"holds <f4 \(4000000,\); the metadata says <f4 \(\d+,\)|compressed")


def _npy_bytes(array):
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---- file mode (issue 12) ----------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_file_mode_follows_the_umask_like_joblib(fitted, tmp_path, umask, mode):
    """Saved models used to be 0600 whatever the umask (mkstemp's mode), so
    others could not read a shared model; now they are created as open()
    and joblib.dump create files: 0666 less the umask."""
    import joblib

    previous = os.umask(umask)
    try:
        fitted.save(tmp_path / "m.npz")
        fitted.save(tmp_path / "m.npz")  # replacing a file gives the same mode
        joblib.dump([1], tmp_path / "m.joblib")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == mode
    assert os.stat(tmp_path / "m.joblib").st_mode & 0o777 == mode
    assert sorted(os.listdir(tmp_path)) == ["m.joblib", "m.npz"]  # no temporary left


def test_file_format_does_not_import_the_estimator():
    """Issue 11: no import cycle. The estimator module registers its class
    with hvae.file_format, which imports no estimator module."""
    import ast
    import hvae.file_format as file_format

    tree = ast.parse(open(file_format.__file__, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update(f"{'.' * node.level}{node.module or ''}.{a.name}".replace("..", ".")
                            for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [name for name in imported if "estimator" in name], imported
    assert file_format._ESTIMATORS["HierarchicalVAE"].cls is HierarchicalVAE
