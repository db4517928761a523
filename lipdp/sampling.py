"""Batch samplers whose behaviour matches the privacy accounting.

* :class:`PoissonSampler` (``kind = "poisson"``): every step, each example is
  included independently with probability ``sampling_rate``; batch sizes vary
  and may be zero. This is what ``sampling="poisson"`` accounting assumes.
* :class:`ShuffleSampler` (``kind = "shuffle"``): each epoch, a fresh shuffle
  cut into fixed-size batches (the remainder is dropped), matching
  ``sampling="shuffle"`` accounting.

Randomness comes from numpy's ``np.random.default_rng``, which is not a
cryptographically secure generator: fine for research, but a deployment that
must resist an adversary predicting the samples needs a secure source.
Amplification by subsampling assumes the batches stay secret: a sampler
seed (``seed=...``) must not be published, or the guarantee degrades to the
one without amplification. The default ``seed=None`` draws OS entropy.
"""

import math

import numpy as np
import tensorflow as tf

from lipdp.accounting import SAMPLINGS


def steps_per_epoch(kind, dataset_size, batch_size):
    """The one rule for the length of an epoch, used by samplers, accounting and the CLI.

    * ``"poisson"``: ``ceil(N / B)`` steps for an expected batch size ``B = q N``
      (``ceil(1 / q)``), so that ``E`` epochs make at least ``E`` expected
      passes over the data: ``N = 60,000, B = 256`` gives 235 steps per epoch
      (``1 / q = 234.375``). ``1 / q`` is rounded to 9 decimals first, so an
      exact ratio such as ``N / B = 10`` is not pushed to 11 by float rounding.
    * ``"shuffle"``: ``N // B`` full batches (the remainder is dropped).

    ``E`` epochs are ``E * steps_per_epoch`` steps; fractional epochs are not
    a unit of training.
    """
    if kind == "poisson":
        return max(1, math.ceil(round(dataset_size / batch_size, 9)))
    if kind == "shuffle":
        return dataset_size // batch_size
    raise ValueError(f"unknown sampler kind {kind!r}; choose one of {', '.join(SAMPLINGS)}")


def _check_arrays(x, y):
    """Returns ``(x, y)`` as numpy arrays with a common, non-zero length."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"x and y must have a batch dimension, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same first dimension, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("x and y are empty")
    for name, array in (("x", x), ("y", y)):
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf: clean the data before training (checked here, "
                             "before any private step, so that no step fails on a sampled record)")
    return x, y


def _batch_dataset(generator, x, y, batch_size):
    """An infinite ``tf.data.Dataset`` of ``(x_batch, y_batch)`` from ``generator``."""
    signature = (tf.TensorSpec((batch_size,) + x.shape[1:], tf.as_dtype(x.dtype)),
                 tf.TensorSpec((batch_size,) + y.shape[1:], tf.as_dtype(y.dtype)))
    return tf.data.Dataset.from_generator(generator, output_signature=signature).prefetch(tf.data.AUTOTUNE)


class _SeedStream:
    """Gives every iteration of a sampler's dataset an independent generator.

    Privacy accounting assumes each step samples afresh. Restarting from the
    same seed when ``fit`` is called again (or a run resumes) would replay
    the same batches, so each iteration draws a new child of one
    ``np.random.SeedSequence``: reproducible for a given seed, never repeated.
    """

    def _init_seeds(self, seed):
        self.seed = seed
        self._seeds = np.random.SeedSequence(seed)

    def _fresh_rng(self):
        return np.random.default_rng(self._seeds.spawn(1)[0])


class PoissonSampler(_SeedStream):
    """Poisson subsampling: each example joins each batch with probability q.

    Args:
        x: Inputs, a numpy array of shape ``(N, ...)``.
        y: Targets, a numpy array of shape ``(N, ...)``.
        sampling_rate: Inclusion probability q in (0, 1].
        expected_batch_size: q * N, in (0, N]; give it or ``sampling_rate``,
            not both.
        seed: Seed (an int or a list of ints) of the numpy seed sequence used
            by :meth:`dataset`; each new iteration of the dataset uses a new,
            independent child of it. ``None`` draws fresh entropy.
    """

    kind = "poisson"

    def __init__(self, x, y, *, sampling_rate=None, expected_batch_size=None, seed=None):
        self.x, self.y = _check_arrays(x, y)
        self.dataset_size = len(self.x)
        if (sampling_rate is None) == (expected_batch_size is None):
            raise ValueError("give exactly one of sampling_rate and expected_batch_size")
        if expected_batch_size is not None:
            if not 0 < expected_batch_size <= self.dataset_size:
                raise ValueError(f"expected_batch_size must be in (0, {self.dataset_size}], got {expected_batch_size!r}")
            sampling_rate = expected_batch_size / self.dataset_size
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        self.sampling_rate = float(sampling_rate)
        self._init_seeds(seed)

    @property
    def expected_batch_size(self):
        """Mean batch size q * N (a float)."""
        return self.sampling_rate * self.dataset_size

    @property
    def steps_per_epoch(self):
        """``ceil(1 / q)``: at least one expected pass over the data (see :func:`steps_per_epoch`)."""
        return steps_per_epoch(self.kind, self.dataset_size, self.expected_batch_size)

    def sample_indices(self, rng):
        """Draws one batch: sorted indices, each included with probability q.

        The batch size is drawn from Binomial(N, q), then a uniform subset of
        that size, which has the same distribution as N independent coin flips.

        Args:
            rng: A ``np.random.Generator``.
        """
        size = rng.binomial(self.dataset_size, self.sampling_rate)
        return np.sort(rng.choice(self.dataset_size, size, replace=False))

    def dataset(self):
        """Infinite ``tf.data.Dataset`` of ``(x_batch, y_batch)``, batch size varying (possibly 0)."""
        def batches():
            rng = self._fresh_rng()
            while True:
                indices = self.sample_indices(rng)
                yield self.x[indices], self.y[indices]

        return _batch_dataset(batches, self.x, self.y, None)


class ShuffleSampler(_SeedStream):
    """Fixed-size batches from a fresh shuffle each epoch, remainder dropped.

    Args:
        x: Inputs, a numpy array of shape ``(N, ...)``.
        y: Targets, a numpy array of shape ``(N, ...)``.
        batch_size: Examples per batch, in [1, N].
        seed: Seed (an int or a list of ints) of the numpy seed sequence used
            by :meth:`dataset`; each new iteration of the dataset uses a new,
            independent child of it. ``None`` draws fresh entropy.
    """

    kind = "shuffle"

    def __init__(self, x, y, *, batch_size, seed=None):
        self.x, self.y = _check_arrays(x, y)
        self.dataset_size = len(self.x)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > self.dataset_size:
            raise ValueError(f"batch_size={batch_size} exceeds the dataset size {self.dataset_size}")
        self.batch_size = int(batch_size)
        self._init_seeds(seed)

    @property
    def sampling_rate(self):
        """``batch_size / N``, for reporting only (shuffle accounting does not use it)."""
        return self.batch_size / self.dataset_size

    @property
    def expected_batch_size(self):
        """The batch size (it is fixed)."""
        return self.batch_size

    @property
    def steps_per_epoch(self):
        """Full batches per epoch, ``N // batch_size`` (see :func:`steps_per_epoch`)."""
        return steps_per_epoch(self.kind, self.dataset_size, self.batch_size)

    def epoch_indices(self, rng):
        """Draws one epoch: an int array of shape ``(steps_per_epoch, batch_size)`` of distinct indices.

        Args:
            rng: A ``np.random.Generator``.
        """
        used = self.steps_per_epoch * self.batch_size
        return rng.permutation(self.dataset_size)[:used].reshape(self.steps_per_epoch, self.batch_size)

    def dataset(self):
        """Infinite ``tf.data.Dataset`` of ``(x_batch, y_batch)`` with a static batch size."""
        def batches():
            rng = self._fresh_rng()
            while True:
                for indices in self.epoch_indices(rng):
                    yield self.x[indices], self.y[indices]

        return _batch_dataset(batches, self.x, self.y, self.batch_size)


def make_sampler(kind, x, y, *, batch_size, seed=None):
    """Builds a sampler of the given kind.

    Args:
        kind: ``"poisson"`` (``batch_size`` is the expected batch size) or
            ``"shuffle"``.
        x, y: Numpy arrays with the same first dimension.
        batch_size: Expected (poisson) or fixed (shuffle) batch size.
        seed: Seed of the sampler's numpy generator.

    Raises:
        ValueError: ``kind`` is unknown, or the sampler rejects its arguments.
    """
    if kind == "poisson":
        return PoissonSampler(x, y, expected_batch_size=batch_size, seed=seed)
    if kind == "shuffle":
        return ShuffleSampler(x, y, batch_size=batch_size, seed=seed)
    raise ValueError(f"unknown sampler kind {kind!r}; choose one of {', '.join(SAMPLINGS)}")
