"""Tests for hvae.metrics: each disentanglement metric on codes whose answer is
known (the factors themselves plus noise dimensions; a random rotation of
them; a duplicated or shared factor), and against small independent
computations written here from the papers' formulas.

Thresholds (perfect code / its random rotation), chosen with margin around
the values seen with these seeds:
FactorVAE >= 0.99 / <= 0.9 (seen 1.0 / 0.85); MIG >= 0.95 / <= 0.25 (0.98 /
0.06; on sprite-sized factors >= 0.85 / <= 0.25, seen 0.88 / 0.17, the 20
bins capping 40- and 32-class factors); DCI disentanglement and
completeness >= 0.95 / <= 0.5 (1.0 / 0.25); continuous SAP >= 0.95 / <= 0.5
(1.0 / 0.11).
"""

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from scipy.stats import ortho_group
from sklearn.ensemble import GradientBoostingClassifier

from hvae import metrics
from hvae.datasets import SPRITES_FACTOR_SIZES, FactorDataset, Sprites

SMALL_SIZES = (3, 6, 10, 16)  # at most 20 classes: the 20-bin MIG can capture each fully
N_NOISE = 3


def identity_dataset(sizes):
    """Observations = factor classes scaled to [0, 1]."""
    scale = np.array(sizes, dtype=np.float64) - 1
    return FactorDataset(sizes, render=lambda f: f / scale)


def perfect_encoder(seed=5):
    """The factors themselves plus N_NOISE Gaussian dimensions (fresh noise per call)."""
    rng = np.random.default_rng(seed)
    return lambda x: np.hstack([x, 0.3 * rng.standard_normal((len(x), N_NOISE))])


def rotated_encoder(n_factors, seed=1):
    encode = perfect_encoder()
    rotation = ortho_group.rvs(n_factors + N_NOISE, random_state=seed)
    return lambda x: encode(x) @ rotation


def small_codes(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    factors = np.stack([rng.integers(0, s, n) for s in SMALL_SIZES], axis=1)
    codes = np.hstack([factors / (np.array(SMALL_SIZES) - 1), 0.3 * rng.standard_normal((n, N_NOISE))])
    rotated = codes @ ortho_group.rvs(codes.shape[1], random_state=seed)
    return codes, rotated, factors


# --- FactorVAE score -----------------------------------------------------------

FAST_FACTOR_VAE = dict(n_train=1000, n_eval=500, n_variance_estimate=2000)


def test_factor_vae_perfect_vs_rotated():
    ds = identity_dataset(SPRITES_FACTOR_SIZES)
    perfect, details = metrics.factor_vae_score(perfect_encoder(), ds, random_state=0,
                                                return_details=True, **FAST_FACTOR_VAE)
    rotated = metrics.factor_vae_score(rotated_encoder(5), ds, random_state=0, **FAST_FACTOR_VAE)
    assert perfect >= 0.99 and details["train_accuracy"] >= 0.99
    assert rotated <= 0.9, rotated
    assert details["n_active_dims"] == 5 + N_NOISE
    # Every vote of factor k went to dimension k; noise dimensions never win.
    assert details["eval_votes"].sum() == 500 and details["train_votes"].sum() == 1000
    assert np.array_equal(np.argmax(details["train_votes"], axis=0)[:5], np.arange(5))
    assert details["train_votes"][:, 5:].sum() == 0


def test_factor_vae_shared_dimension_scores_two_thirds():
    # z = (f0 + f1, f2, noise): fixing f0 or f1 halves dimension 0's variance,
    # fixing f2 freezes dimension 1. The majority vote can give dimension 0 to
    # only one of f0, f1: accuracy 1/3 + 1/3 in expectation.
    ds = identity_dataset((8, 8, 8))
    rng = np.random.default_rng(0)

    def encode(x):
        return np.stack([x[:, 0] + x[:, 1], x[:, 2], rng.standard_normal(len(x))], axis=1)

    score, details = metrics.factor_vae_score(encode, ds, random_state=1, return_details=True,
                                              **FAST_FACTOR_VAE)
    assert abs(score - 2 / 3) < 0.06, score
    assert details["eval_votes"][2, 1] == details["eval_votes"][2].sum()


def test_factor_vae_prunes_collapsed_dimensions_and_chance_level():
    ds = identity_dataset((4, 4, 4))
    rng = np.random.default_rng(0)
    # Dimension 3 is constant (collapsed to the prior): never a candidate.
    score, details = metrics.factor_vae_score(
        lambda x: np.hstack([x, np.full((len(x), 1), 0.01)]), ds, random_state=0,
        return_details=True, **FAST_FACTOR_VAE)
    assert score >= 0.99 and details["active_dims"].tolist() == [True, True, True, False]
    # A code independent of the factors: near chance (1/3), far below 1.
    noise = metrics.factor_vae_score(lambda x: rng.standard_normal((len(x), 4)), ds,
                                     random_state=0, **FAST_FACTOR_VAE)
    assert noise < 0.5, noise
    # Everything collapsed: 0, as disentanglement_lib returns.
    assert metrics.factor_vae_score(lambda x: np.zeros((len(x), 2)), ds, random_state=0,
                                    **FAST_FACTOR_VAE) == 0.0


def test_factor_vae_is_deterministic_and_chunking_free_of_effect_on_perfect_code():
    ds = identity_dataset((3, 5))
    encode = lambda x: 2 * x  # noqa: E731  (deterministic encoder)
    a = metrics.factor_vae_score(encode, ds, random_state=3, **FAST_FACTOR_VAE)
    b = metrics.factor_vae_score(encode, ds, random_state=3, chunk_rows=100, **FAST_FACTOR_VAE)
    assert a == b == 1.0
    with pytest.raises(TypeError):
        metrics.factor_vae_score(encode, np.zeros((3, 2)))


def test_factor_vae_on_sprites_with_a_hand_made_encoder():
    # An encoder of sprite images that reads off pixel count (scale) and the
    # centroid (positions): the three dimensions win their factors' votes.
    ds = Sprites(image_size=16)
    grid = np.mgrid[0:16, 0:16].reshape(2, -1) + 0.5

    def encode(x):
        mass = x.sum(axis=1)
        return np.stack([mass, x @ grid[1] / mass, x @ grid[0] / mass], axis=1)

    score, details = metrics.factor_vae_score(encode, ds, random_state=0, return_details=True,
                                              n_train=200, n_eval=200, n_variance_estimate=500)
    classifier = np.argmax(details["train_votes"], axis=0)
    assert classifier.tolist() == [1, 3, 4]  # scale, pos_x, pos_y
    # Shape and orientation have no dimension of their own: 3 of 5 factors in
    # expectation, give or take 0.035 (one s.d. over 200 votes).
    assert 0.45 < score < 0.75, score


# --- MIG -----------------------------------------------------------------------

def plain_mig(codes, factors, n_bins=20):
    """MIG from the formula with plain NumPy: histogram bins, plug-in MI in nats."""
    def mi(a, b):
        joint = np.zeros((a.max() + 1, b.max() + 1))
        np.add.at(joint, (a, b), 1.0)
        joint /= joint.sum()
        outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
        nz = joint > 0
        return float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))

    gaps = []
    for k in range(factors.shape[1]):
        v = np.unique(factors[:, k], return_inverse=True)[1]
        infos = []
        for i in range(codes.shape[1]):
            lo, hi = codes[:, i].min(), codes[:, i].max()
            b = np.minimum(((codes[:, i] - lo) / (hi - lo) * n_bins).astype(int), n_bins - 1)
            infos.append(mi(b, v))
        infos.sort(reverse=True)
        gaps.append((infos[0] - infos[1]) / mi(v, v))
    return float(np.mean(gaps))


def test_mig_perfect_vs_rotated_and_against_plain_formula():
    codes, rotated, factors = small_codes()
    perfect = metrics.mutual_info_gap(codes, factors)
    rot = metrics.mutual_info_gap(rotated, factors)
    assert perfect >= 0.95 and rot <= 0.25, (perfect, rot)
    assert perfect == pytest.approx(plain_mig(codes, factors), abs=1e-9)
    assert rot == pytest.approx(plain_mig(rotated, factors), abs=1e-9)
    assert metrics.mutual_info_gap(codes, factors, n_bins=7) == pytest.approx(
        plain_mig(codes, factors, n_bins=7), abs=1e-9)


def test_mig_sprite_sized_factors_capped_by_bins():
    ds = identity_dataset(SPRITES_FACTOR_SIZES)
    codes, factors = metrics.sample_codes(perfect_encoder(), ds, 5000, random_state=1)
    mig, details = metrics.mutual_info_gap(codes, factors, return_details=True)
    rot_codes, rot_factors = metrics.sample_codes(rotated_encoder(5), ds, 5000, random_state=1)
    assert mig >= 0.85 and metrics.mutual_info_gap(rot_codes, rot_factors) <= 0.25
    assert details["best_code"].tolist() == [0, 1, 2, 3, 4]
    # 20 bins hold at most log 20 nats: the 40-class orientation's gap is
    # log 20 / log 40 less the small plug-in bias of the other dimensions.
    assert details["gap_per_factor"][2] == pytest.approx(np.log(20) / np.log(40), abs=0.03)


def test_mig_duplicated_factor_has_no_gap():
    codes, _, factors = small_codes()
    duplicated = np.hstack([codes[:, :1], codes])  # factor 0 in dimensions 0 and 1
    mig, details = metrics.mutual_info_gap(duplicated, factors, return_details=True)
    assert details["gap_per_factor"][0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(details["gap_per_factor"][1:] >= 0.95)
    assert mig == pytest.approx(np.mean(details["gap_per_factor"]))
    # A factor shared by no dimension (dropped) has a gap near zero as well.
    assert metrics.mutual_info_gap(np.delete(codes, 1, axis=1), factors,
                                   return_details=True)[1]["gap_per_factor"][1] < 0.05
    # Monotone invariance: binning is by range, so an affine map changes nothing.
    assert metrics.mutual_info_gap(3 * codes - 1, factors) == pytest.approx(
        metrics.mutual_info_gap(codes, factors))


def test_mig_bad_input():
    codes, _, factors = small_codes(100)
    with pytest.raises(ValueError):
        metrics.mutual_info_gap(codes[:, :1], factors)  # one dimension: no second best
    with pytest.raises(ValueError):
        metrics.mutual_info_gap(codes, np.zeros((100, 2), dtype=int))  # constant factor
    with pytest.raises(ValueError):
        metrics.mutual_info_gap(codes[:50], factors)


# --- DCI -----------------------------------------------------------------------

def small_gbt():
    # A cut-down version of disentanglement_lib's GradientBoostingClassifier() so
    # the tests stay fast; the formulas after the fit are what is checked.
    return GradientBoostingClassifier(n_estimators=10, max_depth=2)


def plain_dci(codes, factors, codes_test, factors_test):
    """DCI from Eastwood and Williams' formulas, with scipy's entropy."""
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    acc = []
    for k in range(factors.shape[1]):
        model = small_gbt().set_params(random_state=0).fit(codes, factors[:, k])
        importance[:, k] = model.feature_importances_
        acc.append(np.mean(model.predict(codes_test) == factors_test[:, k]))
    d_i = 1 - scipy_entropy(importance.T + 1e-11, base=factors.shape[1])
    c_k = 1 - scipy_entropy(importance + 1e-11, base=codes.shape[1])
    rho = importance.sum(axis=1) / importance.sum()
    weight = importance.sum(axis=0) / importance.sum()
    return float(d_i @ rho), float(c_k @ weight), float(np.mean(acc))


def test_dci_perfect_vs_rotated_and_against_plain_formula():
    codes, rotated, factors = small_codes(n=450)
    perfect = metrics.dci(codes, factors, estimator=small_gbt(), random_state=0)
    rot = metrics.dci(rotated, factors, estimator=small_gbt(), random_state=0)
    assert perfect["disentanglement"] >= 0.95 and perfect["completeness"] >= 0.95
    assert perfect["informativeness_test"] >= 0.95
    assert rot["disentanglement"] <= 0.5 and rot["completeness"] <= 0.5, rot
    assert perfect["importance"].shape == (codes.shape[1], 4)
    # The default split: the first 2/3 of the rows train.
    d, c, i = plain_dci(rotated[:300], factors[:300], rotated[300:], factors[300:])
    assert rot["disentanglement"] == pytest.approx(d, abs=1e-9)
    assert rot["completeness"] == pytest.approx(c, abs=1e-9)
    assert rot["informativeness_test"] == pytest.approx(i, abs=1e-12)
    # An explicit test set gives the same as the split.
    same = metrics.dci(rotated[:300], factors[:300], rotated[300:], factors[300:],
                       estimator=small_gbt(), random_state=0)
    assert same["disentanglement"] == rot["disentanglement"]


def test_dci_entropy_aggregation_on_known_importances():
    class FixedImportances:
        """A classifier whose importances are given: tests the aggregation alone."""

        def __init__(self, table=None, k=None):
            self.table, self.k = table, k

        def get_params(self, deep=True):
            return {"table": self.table, "k": self.k}

        def set_params(self, **params):
            self.__dict__.update(params)
            return self

        def fit(self, X, y):
            column = int(y.max())  # factor k's labels are all k: which column to report
            self.feature_importances_ = self.table[:, column]
            self.label_ = y[0]
            return self

        def predict(self, X):
            return np.full(len(X), self.label_)

    # Dimension 0 serves factor 0 only; dimension 1 serves factors 0 and 1 equally.
    table = np.array([[1.0, 0.0], [0.5, 0.5]])
    codes = np.random.default_rng(0).standard_normal((30, 2))
    factors = np.tile([0, 1], (30, 1))
    r = metrics.dci(codes, factors, estimator=FixedImportances(table))
    # D: code 0 -> 1, code 1 -> 0 (uniform over 2 factors); weights 1/2, 1/2.
    assert r["disentanglement"] == pytest.approx(0.5, abs=1e-6)
    # C: factor 0 has (1, 0.5) -> 1 - H2(2/3, 1/3); factor 1 has (0, 0.5) -> 1; weights 3/4, 1/4.
    h = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))
    assert r["completeness"] == pytest.approx(0.75 * (1 - h) + 0.25, abs=1e-6)
    assert r["informativeness_test"] == 1.0


# --- SAP -----------------------------------------------------------------------

def test_sap_continuous_perfect_vs_rotated_and_formula():
    codes, rotated, factors = small_codes()
    perfect, details = metrics.sap_score(codes, factors, continuous_factors=True,
                                         return_details=True)
    rot = metrics.sap_score(rotated, factors, continuous_factors=True)
    assert perfect >= 0.95 and rot <= 0.5, (perfect, rot)
    # The score matrix is the squared correlation.
    r2 = np.corrcoef(np.hstack([rotated, factors]).T)[:7, 7:] ** 2
    top = np.sort(r2, axis=0)
    assert rot == pytest.approx(np.mean(top[-1] - top[-2]), abs=1e-12)
    assert np.allclose(np.diag(details["score_matrix"][:4]), 1.0)


def test_sap_discrete_binary_factors():
    # Binary factors: the own dimension predicts perfectly, any other one at
    # chance (1/2), so the perfect code's SAP is about 1 - 1/2.
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 2, (900, 3))
    codes = np.hstack([factors + 0.1 * rng.standard_normal((900, 3)), rng.standard_normal((900, 2))])
    perfect = metrics.sap_score(codes, factors)
    rotated = metrics.sap_score(codes @ ortho_group.rvs(5, random_state=2), factors)
    assert 0.4 <= perfect <= 0.6 and rotated < perfect - 0.2, (perfect, rotated)


def test_clustering_accuracy_is_the_best_matching():
    """Against brute force over every matching of 4 clusters to 4 classes;
    relabelled clusters score 1; bad input is named."""
    import itertools

    from hvae.metrics import clustering_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    c = np.where(rng.random(200) < 0.7, (y + 1) % 4, rng.integers(0, 4, 200))
    best = max(np.mean(np.array(perm)[c] == y) for perm in itertools.permutations(range(4)))
    assert clustering_accuracy(y, c) == pytest.approx(best)
    assert clustering_accuracy(y, (y + 2) % 4) == 1.0
    assert clustering_accuracy(y, np.zeros(200, int)) == pytest.approx(np.mean(y == np.bincount(y).argmax()))
    with pytest.raises(ValueError, match="labels_pred"):
        clustering_accuracy(y, c[:-1].astype(float))
    with pytest.raises(ValueError, match="rows"):
        clustering_accuracy(y, c[:-1])
