"""The option names the C core reports (hvae.h, "Names") are exactly the
names the extension accepts, and fit's records carry EPOCH_RECORD_KEYS."""
import re

import numpy as np
import pytest

from hvae import _native
from hvae._native import Model

# Each exported tuple, the Model (or fit) argument it names and the getter
# that reports the choice back.
MODEL_CHOICES = {
    "ACTIVATIONS": "activation",
    "LIKELIHOODS": "likelihood",
    "DECODER_VARIANCES": "decoder_variance",
    "INFERENCES": "inference",
    "MARKOV_KLS": "markov_kl",
    "PRIORS": "prior",
    "LATENT_FAMILIES": "latent_family",
}
FIT_CHOICES = {"OBJECTIVES": "objective", "OPTIMIZERS": "optimizer"}


def small_model(**kwargs):
    return Model(4, [2, 2], [3], **kwargs)


@pytest.mark.parametrize("attribute", sorted(MODEL_CHOICES) + sorted(FIT_CHOICES))
def test_names_are_a_nonempty_tuple_of_distinct_str(attribute):
    names = getattr(_native, attribute)
    assert isinstance(names, tuple) and names
    assert all(isinstance(n, str) and n for n in names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("attribute,argument", sorted(MODEL_CHOICES.items()))
def test_every_reported_model_name_round_trips(attribute, argument):
    for name in getattr(_native, attribute):
        model = small_model(**{argument: name})
        assert getattr(model, argument) == name
        assert f"{argument}='{name}'" in repr(model)
        copy = model.__reduce__()
        assert getattr(copy[0](*copy[1]), argument) == name


def _listed(message):
    return tuple(re.findall(r"'([^']*)'", message.split("; got")[0]))


@pytest.mark.parametrize("attribute,argument", sorted(MODEL_CHOICES.items()))
def test_an_invalid_model_name_lists_exactly_the_reported_names(attribute, argument):
    with pytest.raises(ValueError, match=f"^{argument} must be one of") as info:
        small_model(**{argument: "no-such-name"})
    assert _listed(str(info.value)) == getattr(_native, attribute)


def test_internal_activations_are_not_accepted():
    for internal in ("identity", "logvar_clip", "?"):
        assert internal not in _native.ACTIVATIONS
        with pytest.raises(ValueError):
            small_model(activation=internal)


@pytest.mark.parametrize("attribute,argument", sorted(FIT_CHOICES.items()))
def test_every_reported_fit_name_is_accepted_and_no_other(attribute, argument):
    X = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    for name in getattr(_native, attribute):
        model = small_model()
        model.fit(X, n_epochs=1, batch_size=4, **{argument: name})
    with pytest.raises(ValueError, match=f"^{argument} must be one of") as info:
        small_model().fit(X, **{argument: "no-such-name"})
    assert _listed(str(info.value)) == getattr(_native, attribute)


def test_fit_records_carry_exactly_the_declared_keys():
    X = np.random.default_rng(1).random((8, 4), dtype=np.float32)
    records = small_model().fit(X, n_epochs=2, batch_size=4)
    assert isinstance(_native.EPOCH_RECORD_KEYS, tuple)
    for record in records:
        assert tuple(record) == _native.EPOCH_RECORD_KEYS
