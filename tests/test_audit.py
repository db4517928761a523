"""Membership-inference audit: the DP bounds on advantage and AUC, and the attacks on a tiny model."""

import math

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import audit
from lipdp import data as lipdp_data
from lipdp import layers as L


# -- the bounds -----------------------------------------------------------------------
def roc_frontier(epsilon, delta, x):
    """The largest TPR at FPR x that (epsilon, delta)-DP allows."""
    e = math.exp(epsilon)
    return np.minimum.reduce([e * x + delta, 1 - (1 - delta - x) / e, np.ones_like(x)])


def test_advantage_bound_known_values():
    assert audit.advantage_bound(0.0, 0.0) == 0.0
    assert audit.advantage_bound(0.0, 1e-3) == pytest.approx(1e-3)
    assert audit.advantage_bound(math.log(3.0), 0.0) == pytest.approx(0.5)  # (3 - 1) / (3 + 1)
    assert audit.advantage_bound(math.inf, 0.0) == 1.0
    assert audit.advantage_bound(50.0, 1e-5) == pytest.approx(1.0)


@pytest.mark.parametrize("epsilon,delta", [(0.0, 0.0), (0.5, 1e-5), (1.0, 0.01), (4.0, 1e-4), (8.0, 0.1)])
def test_bounds_match_the_roc_region_numerically(epsilon, delta):
    x = np.linspace(0.0, 1.0, 200001)
    frontier = roc_frontier(epsilon, delta, x)
    assert audit.advantage_bound(epsilon, delta) == pytest.approx(np.max(frontier - x), abs=1e-5)
    area = np.sum(np.diff(x) * (frontier[1:] + frontier[:-1]) / 2)  # the trapezoidal rule
    assert audit.auc_bound(epsilon, delta) == pytest.approx(area, abs=1e-6)


def test_bounds_are_monotone_and_in_range():
    epsilons = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    for delta in (0.0, 1e-5, 1e-2):
        advantages = [audit.advantage_bound(e, delta) for e in epsilons]
        aucs = [audit.auc_bound(e, delta) for e in epsilons]
        assert np.all(np.diff(advantages) > 0) and np.all(np.diff(aucs) > 0)
        assert 0 <= advantages[0] and advantages[-1] <= 1 and 0.5 <= aucs[0] and aucs[-1] <= 1
    assert audit.advantage_bound(1.0, 1e-2) > audit.advantage_bound(1.0, 1e-5)
    assert audit.auc_bound(0.0, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        audit.advantage_bound(-1.0, 0.0)


def test_sampling_margins_shrink_with_more_samples():
    small, large = audit.sampling_margins(100, 100), audit.sampling_margins(10000, 10000)
    assert large["advantage"] < small["advantage"] and large["auc"] < small["auc"]
    assert large["advantage"] == pytest.approx(small["advantage"] / 10)


# -- the attacks ------------------------------------------------------------------------
def synthetic(member_shift, n_members=300, n_nonmembers=200, seed=0):
    rng = np.random.default_rng(seed)
    loss_in = rng.exponential(1.0, n_members) / (1.0 + member_shift)
    loss_out = rng.exponential(1.0, n_nonmembers)
    logits = lambda n: rng.normal(size=(n, 3))  # noqa: E731
    return audit.AttackData(
        logits(n_members),
        loss_in,
        rng.integers(0, 3, n_members),
        logits(n_nonmembers),
        loss_out,
        rng.integers(0, 3, n_nonmembers),
    )


def test_balancing_subsamples_the_larger_side():
    balanced = synthetic(0.0).balanced(seed=0)
    assert len(balanced.loss_members) == len(balanced.loss_nonmembers) == 200
    assert len(balanced.logits_members) == len(balanced.labels_members) == 200


def test_attacks_separate_members_only_when_they_differ():
    _, leaky = audit.run_attacks(synthetic(20.0))
    _, private = audit.run_attacks(synthetic(0.0))
    assert leaky["threshold"][0] > 0.9 and leaky["threshold"][1] > 0.6
    assert abs(private["threshold"][0] - 0.5) < 0.1 and private["threshold"][1] < 0.2
    for auc, advantage in list(leaky.values()) + list(private.values()):
        assert 0 <= auc <= 1 and 0 <= advantage <= 1


def test_audit_flags_attacks_beyond_the_bound():
    result = audit.audit(synthetic(20.0), epsilon=0.1, delta=0.0)
    assert result["exceeds_bound"] and result["attacks"]["threshold"]["exceeds_bound"]
    result = audit.audit(synthetic(0.0), epsilon=8.0, delta=1e-5)
    assert not result["exceeds_bound"]


def test_audit_of_a_tiny_trained_model():
    data = lipdp_data.load_digits()
    tf.keras.utils.set_random_seed(0)
    model = lipdp.DPSequential(
        [tf.keras.Input(data.input_shape), L.InputNormClip(8.0), L.Flatten(), L.LipschitzDense(10)], noise_seed=0
    )
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    sampler = lipdp.PoissonSampler(data.x_train, data.y_train, expected_batch_size=256, seed=0)
    model.make_private(sampler, noise_multiplier=2.0, delta=1e-4)
    model.fit(sampler, epochs=1, verbose=0)
    attack_data = audit.attack_data(model, data.x_train, data.y_train, data.x_test, data.y_test)
    result = audit.audit(attack_data, model.epsilon(), 1e-4)
    assert result["members"] == result["nonmembers"] == len(data.x_test)
    for attack in result["attacks"].values():
        assert 0 <= attack["auc"] <= 1 and 0 <= attack["advantage"] <= 1
    assert not result["exceeds_bound"]
    assert "advantage" in audit.summary(result)
