"""hvae.load on files crafted with valid checksums (issue 16, items 6 and 7).

Anyone can rewrite a model file and recompute its checksums: the SHA-256 of
every array and of the metadata detect corruption and careless edits, not a
deliberate author. So every field is validated on load, and this suite
proves it by brute force: it changes every field of a saved file, one at a
time (metadata values to other types, out-of-range and inconsistent values,
keys removed and added; array values to NaN, infinity, huge and negative
numbers), recomputes every checksum, and asserts that each file is either
refused with a ValueError naming it, or loads into a model that trains (a
partial_fit succeeds, with finite results) and whose metadata describes it
(architecture, history length, step count). The reproducers of the issue
(a poisoned optimizer state, an activation changed in the model but not in
the parameters, a history that does not fit n_iter_) are tests of their own.
"""
import copy
import hashlib
import io
import json
import math
import os
import warnings
import zipfile

import numpy as np
import pytest

import hvae
from hvae._params import validate_parameters
from hvae.estimator import _model_options
from hvae import HierarchicalVAE

DIGEST = "metadata_sha256"


def make_data():
    rng = np.random.default_rng(0)
    X = (rng.random((48, 6)) < 0.3).astype(np.float32)
    y = np.arange(48) % 3
    return X, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved files of two small models: Adam with validation history and early
    stopping, and a conditional SGD model with class labels and feature names."""
    X, y = make_data()
    adam = HierarchicalVAE(latent_dims=(3, 2), hidden_dims=(5,), likelihood="bernoulli",
                           n_epochs=3, batch_size=16, random_state=0, n_threads=1,
                           early_stopping=True, n_iter_no_change=5)
    adam.fit(X, validation_data=X[:8])
    sgd = HierarchicalVAE(latent_dims=(2,), hidden_dims=(4,), likelihood="gaussian",
                          optimizer="sgd", learning_rate=1e-2, n_epochs=2, batch_size=16,
                          random_state=1, n_threads=1, conditional=True)
    sgd.fit(X, y)
    sgd.feature_names_in_ = np.array([f"f{i}" for i in range(6)], dtype=object)
    directory = tmp_path_factory.mktemp("crafted")
    out = {}
    for name, vae in (("adam", adam), ("sgd", sgd)):
        vae.save(directory / f"{name}.hvae")
        out[name] = (directory / f"{name}.hvae").read_bytes()
    return out


def read(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    return json.loads(members.pop("metadata").tobytes().decode("utf-8")), members


def digest(metadata):
    body = {key: value for key, value in metadata.items() if key != DIGEST}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_NPY = {}  # id(array) -> (array, its .npy bytes, its SHA-256): members are reused


def npy(array):
    if id(array) not in _NPY:
        buffer = io.BytesIO()
        np.save(buffer, array)
        _NPY[id(array)] = (array, buffer.getvalue(), hashlib.sha256(
            np.ascontiguousarray(array).tobytes()).hexdigest())
    return _NPY[id(array)]


def write(path, metadata, members, rehash=True):
    """The file of these members (as np.savez writes it), every checksum
    recomputed (unless not rehash)."""
    if rehash and isinstance(metadata.get("arrays"), dict):
        metadata = dict(metadata, arrays={
            name: dict(spec, sha256=npy(members[name])[2])
            if isinstance(spec, dict) and name in members else spec
            for name, spec in metadata["arrays"].items()})
        metadata[DIGEST] = digest(metadata)
    text = json.dumps(metadata).encode("utf-8")
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(text, dtype=np.uint8))
    if os.path.exists(path):
        os.unlink(path)  # cheaper than truncating on some file systems
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.npy", buffer.getvalue())
        for name, array in members.items():
            archive.writestr(f"{name}.npy", npy(array)[1])
    return path


def leaves(value, path=()):
    """Paths of every value in the metadata; of a list's entries, which are
    alike, the first (and the last tensor of the layout)."""
    yield path
    if isinstance(value, dict):
        for key in value:
            yield from leaves(value[key], path + (key,))
    elif isinstance(value, list) and value:
        for i in sorted({0, len(value) - 1} if path == ("layout",) else {0}):
            yield from leaves(value[i], path + (i,))


def get(metadata, path):
    for key in path:
        metadata = metadata[key]
    return metadata


def replacements(value):
    """Values to put in place of `value`: other types, edges, nonsense."""
    out = [None, True, -1, 2**63, 1e39, math.nan, "relu", []]
    if isinstance(value, bool):
        out += [not value]
    elif isinstance(value, int):
        out += [0, value + 1, value - 1, -(2**63), float(value)]
    elif isinstance(value, float):
        out += [-value, value * 1e6 + 1, math.inf, 3e38]
    elif isinstance(value, str):
        out += [value + "x", "tanh", "sgd", "gaussian", "ladder", "unit"]
    elif isinstance(value, list):
        out += [value[:-1], value + value[-1:] if value else [0], [value]]
    elif isinstance(value, dict):
        out += [{}, dict(value, unknown=1)]
    return [v for v in out if not (type(v) is type(value) and v == value)]


def checks_out(loaded, X, y, conditional, path):
    """A loaded model trains and its metadata describes it."""
    model = loaded.model_
    if conditional and loaded.classes_ is None:  # conditions as rows, not labels
        y = np.eye(model.n_conditions, dtype=np.float32)[y % model.n_conditions]
    claimed = _model_options(validate_parameters(loaded))
    assert {key: getattr(model, key) for key in claimed} == claimed, path
    assert loaded.n_iter_ == len(loaded.history_["elbo"]), path
    assert all(len(v) == loaded.n_iter_ for v in loaded.history_.values()), path
    assert model.optimizer_steps <= sum(loaded.history_["n_batches"]), path
    loaded.set_params(n_threads=1, verbose=0)
    n_iter, steps = loaded.n_iter_, model.optimizer_steps
    state = model.__getstate__()["optimizer"]
    same_optimizer = state is not None and state["kind"] == loaded.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded.partial_fit(X, y if conditional else None)
        except hvae.DivergenceError:
            # Finite parameters can be bad ones (a file is the model it
            # describes): training them may diverge at the file's learning
            # rate, leaving the model as it was, but never at every rate, as
            # a poisoned optimizer state did.
            assert loaded.n_iter_ == n_iter and model.optimizer_steps == steps, path
            loaded.set_params(learning_rate=1e-6).partial_fit(X, y if conditional else None)
        assert loaded.n_iter_ == n_iter + 1, path
        assert all(len(v) == n_iter + 1 for v in loaded.history_.values()), path
        assert model.optimizer_steps > (steps if same_optimizer else 0), path
        assert np.all(np.isfinite(model.parameters)), path
        # (an ndarray for a model fitted with feature names: sklearn warns)
        assert np.all(np.isfinite(loaded.transform(X, y if conditional else None))), path


def judge(path, X, y, conditional, where):
    try:
        loaded = hvae.load(path)
    except ValueError as error:
        assert str(path) in str(error), (where, error)
        return "refused"
    except Exception as error:  # noqa: BLE001 - the test judges the type
        pytest.fail(f"{where}: {type(error).__name__}: {error}")
    try:
        checks_out(loaded, X, y, conditional, where)
    except AssertionError:
        raise
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"{where} loaded, then: {type(error).__name__}: {error}")
    return "trains"


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_every_metadata_field_crafted_is_refused_or_trains(files, tmp_path, name):
    X, y = make_data()
    metadata, members = read(files[name])
    outcomes = {"refused": 0, "trains": 0}
    path = tmp_path / "crafted.hvae"
    for where in list(leaves(metadata)):
        if not where or where[-1] in ("sha256", DIGEST):
            continue  # recomputed for every file (edited alone: see the digest test)
        if name == "sgd" and where[0] not in ("model", "state", "attributes"):
            continue  # the same as the Adam model's
        # Changed in place and put back: a copy per change would cost more.
        parent, key = get(metadata, where[:-1]), where[-1]
        original = parent[key]
        for value in replacements(original):
            parent[key] = value
            write(path, metadata, members)
            parent[key] = original
            outcomes[judge(path, X, y, name == "sgd", (where, value))] += 1
        if isinstance(parent, dict):
            del parent[key]
            write(path, metadata, members)
            parent[key] = original
            outcomes[judge(path, X, y, name == "sgd", (where, "deleted"))] += 1
    # Most changes are refused; some are other valid models (a longer
    # training time in history_, another tol...), which train.
    assert outcomes["refused"] > 500 and outcomes["trains"] > 20, outcomes


def array_values(name, array):
    big = np.float32(3e38)
    edits = {"nan": lambda a: a.__setitem__(0, np.nan),
             "inf": lambda a: a.__setitem__(-1, np.inf),
             "huge": lambda a: a.__setitem__(0, big),
             "all huge": lambda a: a.__setitem__(slice(None), big),
             "all -huge": lambda a: a.__setitem__(slice(None), -big),
             "negative": lambda a: a.__setitem__(slice(None), -np.abs(a) - 1),
             "zeros": lambda a: a.__setitem__(slice(None), 0),
             "1e6": lambda a: a.__setitem__(slice(None), 1e6),
             "negated": lambda a: a.__setitem__(slice(None), -a),
             "noise": lambda a: a.__setitem__(slice(None), np.random.default_rng(0)
                                               .normal(size=a.shape) * 10)}
    for label, edit in edits.items():
        out = np.array(array, copy=True)
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                edit(out)
        except (ValueError, OverflowError):  # NaN into an integer array (classes_)
            continue
        yield label, out
    yield "one shorter", np.array(array[:-1], copy=True)
    yield "float64", np.array(array, dtype=np.float64)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_every_array_crafted_is_refused_or_trains(files, tmp_path, name):
    X, y = make_data()
    metadata, members = read(files[name])
    outcomes = {"refused": 0, "trains": 0}
    path = tmp_path / "crafted.hvae"
    for member in members:
        for label, array in array_values(member, members[member]):
            crafted = copy.deepcopy(metadata)
            crafted["arrays"][member].update(dtype=array.dtype.str, shape=list(array.shape))
            write(path, crafted, dict(members, **{member: array}))
            outcomes[judge(path, X, y, name == "sgd", (member, label))] += 1
    assert outcomes["refused"] >= 10 and outcomes["trains"] >= 3, outcomes


# ---- the reproducers ------------------------------------------------------


def crafted(files, tmp_path, edit, name="adam"):
    metadata, members = read(files[name])
    edit(metadata, members)
    return write(tmp_path / "crafted.hvae", metadata, members)


def set_optimizer(key, value):
    return lambda m, a: m["state"]["optimizer"].__setitem__(key, value)


def set_array(member, fill):
    def edit(m, a):
        a[member] = np.full_like(a[member], fill)
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_optimizer("step", -1), "step count -1 is not in"),
    (set_optimizer("step", -2**63), "step count"),
    (set_optimizer("step", 2**63 - 1), "step count"),
    (set_optimizer("step", 10**6), "step count"),
    (set_optimizer("step", 2.5), "step count"),
    (set_optimizer("beta1", 0.5), "beta1"),
    (set_optimizer("eps", 0.0), "eps"),
    (set_optimizer("learning_rate", -1.0), "learning_rate"),
    (set_array("optimizer.v", -1.0), "second moments 'v' must be >= 0"),
    (set_array("optimizer.m", 3e38), "first moments 'm' exceed"),
    (set_array("optimizer.m", 1.0), "first moments 'm' exceed"),
    (lambda m, a: m["state"].update(rng_state={"__tuple__": [0, 0, 0, 0]}), "rng_state"),
    (lambda m, a: m["state"].update(rng_state={"__tuple__": [2**64, 1, 1, 1]}), "rng_state"),
    (lambda m, a: m["state"].update(rng_state={"__tuple__": [True, 1, 1, 1]}), "rng_state"),
])
def test_a_poisoned_optimizer_or_generator_state_is_refused(files, tmp_path, edit, message):
    path = crafted(files, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        hvae.load(path)
    assert str(path) in str(info.value)


def test_the_unpoisoned_optimizer_state_trains_at_any_learning_rate(files, tmp_path):
    """Before the fix a poisoned state made every continued fit diverge, even
    at learning_rate=1e-9; the saved state itself trains."""
    X, _ = make_data()
    loaded = hvae.load(crafted(files, tmp_path, lambda m, a: None))
    loaded.set_params(learning_rate=1e-9).partial_fit(X)
    assert loaded.n_iter_ == 4


@pytest.mark.parametrize("edit, message", [
    (lambda m, a: m["model"].update(activation="tanh"), "architecture"),
    (lambda m, a: m["params"].update(activation="tanh"), "architecture"),
    (lambda m, a: m["params"].update(conditional=True), "conditional"),
    (lambda m, a: m["attributes"].update(history_=5), "history_ must be a dict"),
    (lambda m, a: m["attributes"].update(history_={}), "history_ must have the keys"),
    (lambda m, a: m["attributes"].update(n_iter_="abc"), "n_iter_ must be an int"),
    (lambda m, a: m["attributes"].update(n_iter_=-7), "n_iter_ must be an int"),
    (lambda m, a: m["attributes"].update(n_iter_=4), "entries"),
    (lambda m, a: [v.extend(v[-1:] * 98) for v in m["attributes"]["history_"].values()],
     "entries"),
    (lambda m, a: m["attributes"].update(best_epoch_=3), "best_epoch_"),
    (lambda m, a: m["attributes"].update(extra_=1), "unknown fitted attributes"),
    (lambda m, a: m["attributes"]["history_"]["n_batches"].__setitem__(0, -1), "n_batches"),
    (lambda m, a: m["attributes"]["history_"]["kl"].__setitem__(0, [0.1]), "KL terms"),
    (lambda m, a: m["params"].update(n_epochs=-1), "n_epochs"),
    (lambda m, a: m["params"].update(batch_size=2**31), "batch_size"),
    (lambda m, a: m["params"].update(learning_rate=1e39), "learning_rate"),
    (lambda m, a: m["params"].update(n_threads=2000), "n_threads"),
    (lambda m, a: m["params"].update(random_state=-1), "random_state"),
    (lambda m, a: m.update(surprise=1), "unknown metadata keys"),
])
def test_altered_metadata_is_refused(files, tmp_path, edit, message):
    path = crafted(files, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        hvae.load(path)
    assert str(path) in str(info.value)


def test_a_consistent_change_of_activation_gives_the_model_it_describes(files, tmp_path):
    """Changed everywhere, with checksums recomputed, the file describes
    another valid model: it loads as that model (tanh), not as the relu model
    with a tanh label."""
    X, _ = make_data()

    def edit(m, a):
        m["model"]["activation"] = m["params"]["activation"] = "tanh"

    loaded = hvae.load(crafted(files, tmp_path, edit))
    assert loaded.activation == loaded.model_.activation == "tanh"
    metadata, members = read(files["adam"])
    rebuilt = hvae.Model(6, (3, 2), (5,), likelihood="bernoulli", activation="tanh")
    rebuilt.parameters[:] = members["parameters"]
    np.testing.assert_array_equal(loaded.model_.encode(X)[0][0], rebuilt.encode(X)[0][0])
    loaded.partial_fit(X)


def test_an_edit_without_new_checksums_is_detected(files, tmp_path):
    """The metadata's own SHA-256 covers what field checks cannot judge: a
    plausible value changed by hand."""
    metadata, members = read(files["adam"])
    metadata["attributes"]["history_"]["elbo"][0] -= 1.0
    path = write(tmp_path / "edited.hvae", metadata, members, rehash=False)
    with pytest.raises(ValueError, match="metadata does not match its SHA-256"):
        hvae.load(path)
    metadata["params"]["tol"] = 0.5
    with pytest.raises(ValueError, match="metadata does not match its SHA-256"):
        hvae.load(write(path, metadata, members, rehash=False))


def test_a_file_written_before_the_metadata_checksum_still_loads(files, tmp_path):
    """Format version 1 files written before the metadata had its SHA-256 load,
    with every field validated as for any other file."""
    metadata, members = read(files["adam"])
    del metadata[DIGEST]
    loaded = hvae.load(write(tmp_path / "old.hvae", metadata, members, rehash=False))
    assert loaded.n_iter_ == 3
