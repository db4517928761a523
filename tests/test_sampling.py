import math

import numpy as np
import pytest
import tensorflow as tf

from lipdp import sampling
from lipdp.policy import PrivacyPolicy
from lipdp.sampling import SAMPLERS as SAMPLINGS
from lipdp.sampling import PoissonSampler, ShuffleSampler, make_sampler

# Bounds below are 5 standard errors of the sampling distribution: with the
# fixed seeds the tests are deterministic, and a correct sampler would fail
# one with probability below ~1e-6.
Z = 5.0


def _data(n, features=(4, 3)):
    x = np.random.default_rng(0).normal(size=(n,) + features).astype(np.float32)
    y = np.arange(n, dtype=np.int64)  # the label identifies the row
    return x, y


def test_poisson_batch_size_distribution():
    n, q, draws = 1000, 0.05, 4000
    sampler = PoissonSampler(*_data(n), sampling_rate=q)
    rng = np.random.default_rng(1)
    sizes = np.array([len(sampler.sample_indices(rng)) for _ in range(draws)])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < Z * math.sqrt(var / draws)
    # Standard error of a sample variance of near-normal data: var * sqrt(2 / (draws - 1)).
    # A fixed-size sampler (variance 0) or a doubled rate fails this.
    assert abs(sizes.var(ddof=1) - var) < Z * var * math.sqrt(2 / (draws - 1))


def test_poisson_inclusion_frequencies():
    n, q, draws = 500, 0.1, 3000
    sampler = PoissonSampler(*_data(n), sampling_rate=q)
    rng = np.random.default_rng(2)
    counts = np.zeros(n)
    for _ in range(draws):
        indices = sampler.sample_indices(rng)
        assert np.all(np.diff(indices) > 0)  # sorted, no repeats
        counts[indices] += 1
    standardized = (counts - draws * q) / math.sqrt(draws * q * (1 - q))
    # Each count is Binomial(draws, q); the sum of squares of n standardized
    # counts is ~ chi-square(n): mean n, standard deviation sqrt(2 n).
    assert abs(np.sum(standardized**2) - n) < Z * math.sqrt(2 * n)
    # Max of n |N(0,1)|: P(max > 5) <= n * 5.7e-7.
    assert np.max(np.abs(standardized)) < Z


def test_poisson_empty_batches_happen():
    n, q, draws = 100, 0.002, 1000
    sampler = PoissonSampler(*_data(n), sampling_rate=q)
    rng = np.random.default_rng(3)
    empty = np.mean([len(sampler.sample_indices(rng)) == 0 for _ in range(draws)])
    p_empty = (1 - q) ** n
    assert abs(empty - p_empty) < Z * math.sqrt(p_empty * (1 - p_empty) / draws)
    sizes = [int(tf.shape(xb)[0]) for xb, _ in sampler.dataset().take(20)]
    assert 0 in sizes


def test_poisson_dataset_elements():
    x, y = _data(300)
    sampler = PoissonSampler(x, y, expected_batch_size=30, seed=7)
    spec_x, spec_y = sampler.dataset().element_spec
    assert spec_x.shape.as_list() == [None, 4, 3] and spec_x.dtype == tf.float32
    assert spec_y.shape.as_list() == [None] and spec_y.dtype == tf.int64
    batches = [(xb.numpy(), yb.numpy()) for xb, yb in sampler.dataset().take(5)]
    for xb, yb in batches:
        assert xb.shape == (len(yb), 4, 3) and xb.dtype == np.float32 and yb.dtype == np.int64
        np.testing.assert_array_equal(xb, x[yb])
    # A second iteration (another fit, a resumed run) never replays the batches...
    again = [yb.numpy() for _, yb in sampler.dataset().take(5)]
    assert not all(np.array_equal(a, b) for (_, a), b in zip(batches, again))
    # ...while a new sampler with the same seed reproduces them; sizes vary.
    same_seed = PoissonSampler(x, y, expected_batch_size=30, seed=7).dataset().take(5)
    assert all(np.array_equal(a, b.numpy()) for (_, a), (_, b) in zip(batches, same_seed))
    assert len({len(yb) for _, yb in batches}) > 1
    other = [yb.numpy() for _, yb in PoissonSampler(x, y, expected_batch_size=30, seed=8).dataset().take(5)]
    assert not all(np.array_equal(a, b) for (_, a), b in zip(batches, other))


@pytest.mark.parametrize(
    "q,steps", [(0.01, 100), (0.3, 4), (0.7, 2), (1.0, 1), (0.004, 250), (0.1, 10), (256 / 60000, 235), (0.07, 15)]
)
def test_poisson_steps_per_epoch_is_ceil_of_one_over_q(q, steps):
    """One rule everywhere: E epochs make at least E expected passes (235, not round(234.375) = 234)."""
    assert PoissonSampler(*_data(10), sampling_rate=q).steps_per_epoch == steps
    assert sampling.steps_per_epoch("poisson", 10, 10 * q) == steps


def test_poisson_attributes_and_errors():
    x, y = _data(200)
    sampler = PoissonSampler(x, y, expected_batch_size=50)
    assert (sampler.kind, sampler.dataset_size, sampler.sampling_rate, sampler.expected_batch_size) == (
        "poisson",
        200,
        0.25,
        50.0,
    )
    with pytest.raises(ValueError, match="sampling_rate and expected_batch_size"):
        PoissonSampler(x, y)
    with pytest.raises(ValueError, match="sampling_rate and expected_batch_size"):
        PoissonSampler(x, y, sampling_rate=0.1, expected_batch_size=20)
    with pytest.raises(ValueError, match="first dimension"):
        PoissonSampler(x, y[:-1], sampling_rate=0.1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        PoissonSampler(x, y, expected_batch_size=201)
    with pytest.raises(ValueError, match="sampling_rate"):
        PoissonSampler(x, y, sampling_rate=0.0)


def test_shuffle_epochs_cover_distinct_examples():
    x, y = _data(103)
    sampler = ShuffleSampler(x, y, batch_size=10, seed=0)
    assert (sampler.kind, sampler.steps_per_epoch, sampler.expected_batch_size) == ("shuffle", 10, 10)
    assert sampler.sampling_rate == pytest.approx(10 / 103)
    spec_x, _ = sampler.dataset().element_spec
    assert spec_x.shape.as_list() == [10, 4, 3]
    batches = [(xb.numpy(), yb.numpy()) for xb, yb in sampler.dataset().take(30)]
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, x[yb])
    epochs = [np.concatenate([yb for _, yb in batches[i : i + 10]]) for i in (0, 10, 20)]
    for labels in epochs:
        assert len(labels) == 100 and len(np.unique(labels)) == 100
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_shuffle_epoch_indices():
    sampler = ShuffleSampler(*_data(25), batch_size=4)
    indices = sampler.epoch_indices(np.random.default_rng(0))
    assert indices.shape == (6, 4) and len(np.unique(indices)) == 24 and indices.max() < 25
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        ShuffleSampler(*_data(5), batch_size=6)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffleSampler(*_data(5), batch_size=0)


def test_make_sampler():
    x, y = _data(100)
    poisson = make_sampler("poisson", x, y, batch_size=20, seed=1)
    assert isinstance(poisson, PoissonSampler) and poisson.sampling_rate == 0.2
    shuffle = make_sampler("shuffle", x, y, batch_size=20)
    assert isinstance(shuffle, ShuffleSampler) and shuffle.batch_size == 20
    assert {poisson.kind, shuffle.kind} == set(SAMPLINGS)
    with pytest.raises(ValueError, match="poisson, shuffle"):
        make_sampler("uniform", x, y, batch_size=20)


@pytest.mark.parametrize("kind", ["poisson", "shuffle"])
@pytest.mark.parametrize("n, batch", [(60000, 256), (1437, 100), (10, 3), (7, 7)])
def test_schedule_from_numbers_is_the_samplers_own(kind, n, batch):
    """PrivacyPolicy.plan on a schedule's numbers gives the policy a sampler of that size gives (no data needed)."""
    x = np.zeros((n, 1), np.float32)
    sampler = make_sampler(kind, x, x, batch_size=batch)
    schedule = sampling.sampler_class(kind).schedule(n, batch)
    assert schedule == dict(
        sampling=sampler.kind,
        dataset_size=sampler.dataset_size,
        sampling_rate=sampler.sampling_rate,
        expected_batch_size=sampler.expected_batch_size,
        steps_per_epoch=sampler.steps_per_epoch,
    )
    arguments = dict(noise_multiplier=2.0, delta=0.01 / n)
    assert PrivacyPolicy.plan(**schedule, **arguments) == PrivacyPolicy.from_sampler(sampler, **arguments)
