"""The estimator's public surface: every constructor parameter documented,
every choice parameter accepting exactly the names the C core reports, and
the parameter table covering every parameter."""
import inspect
import pickle
import re

import numpy as np
import pytest
from sklearn.base import BaseEstimator

import hvae
from hvae import _core
from hvae._params import PARAMETER_CONSTRAINTS, OneOf

PUBLIC_ESTIMATORS = [obj for obj in vars(hvae).values()
                     if inspect.isclass(obj) and issubclass(obj, BaseEstimator)]

#: Each choice parameter of HierarchicalVAE and the C core's tuple of names.
CHOICES = {
    "likelihood": _core.LIKELIHOODS,
    "activation": _core.ACTIVATIONS,
    "decoder_variance": _core.DECODER_VARIANCES,
    "inference": _core.INFERENCES,
    "objective": _core.OBJECTIVES,
    "optimizer": _core.OPTIMIZERS,
    "markov_kl": _core.MARKOV_KLS,
    "gradient_estimator": _core.GRADIENT_ESTIMATORS,
    "score_baseline": _core.SCORE_BASELINES,
    "prior": _core.PRIORS,
    "prior_covariance_type": _core.COVARIANCE_TYPES,
}
#: The settings a choice needs to be usable at all (Gumbel-softmax relaxes a
#: categorical layer).
NEEDS = {("gradient_estimator", "gumbel_softmax"): dict(latent_types="categorical",
                                                        n_categories=3),
         ("prior_covariance_type", "full"): dict(prior="gmm", n_components=2)}


def init_parameters(cls):
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def documented_parameters(docstring):
    """The names the NumPy-style Parameters section of docstring documents."""
    lines = inspect.cleandoc(docstring).splitlines()
    try:
        start = next(i for i in range(len(lines) - 1)
                     if lines[i].strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return set()
    names = set()
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and set(lines[i + 1].strip()) == {"-"}:
            break  # the next section's title
        match = re.match(r"^([A-Za-z_][\w, *]*?)\s*:(\s|$)", line)
        if match and not line.startswith(" "):
            names.update(n.strip().lstrip("*") for n in match.group(1).split(","))
    return names


def test_the_public_estimators_are_found():
    assert hvae.HierarchicalVAE in PUBLIC_ESTIMATORS


@pytest.mark.parametrize("cls", PUBLIC_ESTIMATORS, ids=lambda c: c.__name__)
def test_every_init_parameter_is_documented(cls):
    documented = documented_parameters(cls.__doc__)
    missing = [name for name in init_parameters(cls) if name not in documented]
    assert not missing, f"{cls.__name__}'s docstring does not document {missing}"
    unknown = documented - set(init_parameters(cls))
    assert not unknown, f"{cls.__name__}'s docstring documents no such parameters {unknown}"


def test_the_documentation_check_notices_a_missing_parameter():
    doc = hvae.HierarchicalVAE.__doc__
    entry = re.search(r"\n    free_bits : .*?(?=\n    \w+ : )", doc, flags=re.S)
    assert entry is not None
    without = doc.replace(entry.group(0), "")
    assert "free_bits" in documented_parameters(doc)
    assert "free_bits" not in documented_parameters(without)
    assert documented_parameters(doc) - documented_parameters(without) == {"free_bits"}


def test_the_parameter_table_covers_every_init_parameter():
    assert set(PARAMETER_CONSTRAINTS) == set(init_parameters(hvae.HierarchicalVAE))


def test_the_choice_parameters_are_those_of_the_table():
    choices = {name for name, c in PARAMETER_CONSTRAINTS.items() if isinstance(c, OneOf)}
    assert choices == set(CHOICES)
    for name, names in CHOICES.items():
        assert PARAMETER_CONSTRAINTS[name].names == names, name


def fit_tiny(**params):
    X = np.random.default_rng(0).random((40, 5)).astype(np.float32)
    vae = hvae.HierarchicalVAE(latent_dims=(3, 2), hidden_dims=(8,), n_epochs=1,
                               batch_size=20, random_state=0, n_threads=1, **params)
    return vae.fit(X)


@pytest.mark.parametrize("param, name", [(p, n) for p, names in CHOICES.items()
                                         for n in names])
def test_every_name_the_core_reports_is_accepted(param, name):
    vae = fit_tiny(**{param: name}, **NEEDS.get((param, name), {}))
    assert vae.get_params()[param] == name
    if hasattr(vae.model_, param):  # the Model's own options
        assert getattr(vae.model_, param) == name


def other_names(param):
    names = CHOICES[param]
    others = {n for values in vars(_core).values() if isinstance(values, tuple)
              for n in values if isinstance(n, str)} - set(names)
    return sorted(others | {names[0].upper(), names[0] + " ", "", "x" + names[0]})


@pytest.mark.parametrize("param", sorted(CHOICES))
def test_other_names_are_refused_before_any_work(param):
    for name in other_names(param):
        vae = hvae.HierarchicalVAE(**{param: name})
        with pytest.raises(ValueError, match=f"{param} must be one of"):
            vae.fit(np.zeros((4, 3)))
        assert not hasattr(vae, "model_")
    with pytest.raises(ValueError, match=param):
        hvae.HierarchicalVAE(**{param: None}).fit(np.zeros((4, 3)))


def test_markov_kl_reaches_the_model():
    X = np.random.default_rng(1).random((60, 5)).astype(np.float32)
    fitted = {}
    for markov_kl in _core.MARKOV_KLS:
        vae = hvae.HierarchicalVAE(latent_dims=(3, 2), hidden_dims=(8,), n_epochs=2,
                                   batch_size=20, random_state=0, n_threads=1,
                                   likelihood="bernoulli", markov_kl=markov_kl).fit(X)
        assert vae.model_.markov_kl == markov_kl
        fitted[markov_kl] = vae
    # The estimate differs only where there is a lower Markov layer.
    assert fitted["sampled"].score(X) != fitted["analytic"].score(X)
    assert not np.array_equal(fitted["sampled"].model_.parameters,
                              fitted["analytic"].model_.parameters)
    # markov_kl is part of the model: warm_start with another value starts a
    # new one, and partial_fit refuses it.
    vae = fitted["analytic"]
    vae.set_params(warm_start=True, markov_kl="sampled").fit(X)
    assert vae.model_.markov_kl == "sampled" and vae.n_iter_ == 2
    vae.set_params(markov_kl="analytic")
    with pytest.raises(ValueError, match="markov_kl"):
        vae.partial_fit(X)


def test_an_estimator_pickled_before_markov_kl_loads_with_its_default():
    vae = fit_tiny()
    state = pickle.loads(pickle.dumps(vae)).__getstate__()
    del state["markov_kl"]
    restored = hvae.HierarchicalVAE.__new__(hvae.HierarchicalVAE)
    restored.__setstate__(state)
    assert restored.get_params()["markov_kl"] == "sampled"
    X = np.random.default_rng(0).random((10, 5)).astype(np.float32)
    np.testing.assert_array_equal(restored.transform(X), vae.transform(X))
