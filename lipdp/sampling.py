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

Several replicas (:mod:`lipdp.distribute`): the data set is partitioned into
one fixed shard per replica (example ``i`` of input pipeline ``p`` of ``P``
when ``i % P == p``; within a pipeline, its ``L`` local replicas take every
``L``-th of those). Each global step, every replica draws its part of the batch
from its own shard with the same rule -- Poisson with rate ``q``, or its share
``B / R`` of a shuffled epoch -- from independent randomness. Independent
Poisson(q) draws on disjoint shards form one Poisson(q) draw over all ``N``
examples, and a shuffled epoch still holds each example at most once, so the
accountant sees the same events as on one device.
"""

import math

import dp_accounting
import numpy as np
import tensorflow as tf

from lipdp import streaming
from lipdp.errors import PrivacyParameterError


def check_data(x, y):
    """Returns ``(x, y)`` as numpy arrays with a common, non-zero length."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"x and y must have a batch dimension, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same first dimension, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("x and y are empty")
    check_finite("x", x)
    check_finite("y", y)
    return x, y


def check_finite(name, array):
    """Refuses NaN or inf in a float ``array`` before anything is released or any step is taken.

    Read a block of rows at a time: a memory-mapped ``array`` is never loaded whole.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = sum(_non_finite_rows(block) for block in streaming.row_blocks(np.atleast_1d(array)))
    if bad:
        raise ValueError(
            f"{name} contains NaN or inf ({bad} record(s)): clean the data before training (checked before any "
            "release or private step, so that none is made from, or fails on, such a record)"
        )


def _non_finite_rows(block):
    """How many rows of ``block`` hold a NaN or an inf."""
    return int(np.sum(~np.all(np.isfinite(block.reshape(len(block), -1)), axis=1)))


def array_dataset(x, y, batch_size):
    """The rows of ``(x, y)`` in order, in batches of ``batch_size`` read as they are needed (``validation_data``).

    Unlike arrays passed to Keras, which copies them whole into a tensor, a
    memory-mapped ``x`` is read one batch at a time (:mod:`lipdp.streaming`).
    """

    def batches():
        for start in range(0, len(x), batch_size):
            yield np.arange(start, min(start + batch_size, len(x)))

    return _batch_dataset(batches, x, y, None)


def _batch_dataset(indices, x, y, batch_size):
    """A ``tf.data.Dataset`` of ``(x[i], y[i])`` for each index array ``i`` the generator ``indices`` yields.

    Each batch is gathered when the step asks for it, one copy of its rows
    (:func:`lipdp.streaming.take_rows`), not prefetched: a prefetched batch of
    8,192 scattering features is 0.5 GB held next to the step's. ``batch_size=None``: sizes vary.
    """
    x_spec = (batch_size,) + x.shape[1:]
    y_spec = (batch_size,) + y.shape[1:]

    def gather(index):
        return streaming.take_rows(x, index), y[index]

    def gather_batch(index):
        x_batch, y_batch = tf.numpy_function(gather, [index], (tf.as_dtype(x.dtype), tf.as_dtype(y.dtype)))
        return tf.ensure_shape(x_batch, x_spec), tf.ensure_shape(y_batch, y_spec)

    index_spec = tf.TensorSpec((batch_size,), tf.int64)
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False  # tf.data would prefetch by itself
    return tf.data.Dataset.from_generator(indices, output_signature=index_spec).map(gather_batch).with_options(options)


#: ``{kind: sampler class}``; :func:`register_sampler` adds to it.
SAMPLERS = {}


def register_sampler(cls):
    """Makes a sampler class known by its ``kind`` to configs, the CLI and the accountant."""
    SAMPLERS[cls.kind] = cls
    return cls


def sampler_class(kind):
    """The sampler class of ``kind``; raises :class:`lipdp.errors.PrivacyParameterError` if unknown."""
    if kind not in SAMPLERS:
        raise PrivacyParameterError(f"unknown sampling {kind!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[kind]


def steps_per_epoch(kind, dataset_size, batch_size):
    """The length of an epoch for samplers of ``kind`` (each sampler states its rule in ``epoch_length``)."""
    return sampler_class(kind).epoch_length(dataset_size, batch_size)


def make_sampler(kind, x, y, *, batch_size, seed=None):
    """A sampler of ``kind`` drawing batches of (expected) size ``batch_size`` from ``(x, y)``."""
    return sampler_class(kind).with_batch_size(x, y, batch_size, seed=seed)


class Sampler:
    """What a sampler states about itself for the accountant, and independent seeds per iteration.

    Subclasses set ``kind`` and ``adjacency`` (the neighbouring relation of
    the guarantee, in words), and implement ``epoch_length``,
    ``accounting_unit``, ``dp_event`` and ``with_batch_size``.

    Privacy accounting assumes each step samples afresh. Restarting from the
    same seed when ``fit`` is called again (or a run resumes) would replay
    the same batches, so each iteration of :meth:`dataset` draws a new child
    of one ``np.random.SeedSequence``: reproducible for a given seed, never
    repeated.
    """

    kind = None
    adjacency = None
    #: How far one example can move a sum of contributions of norm <= C under ``adjacency``, in units of C.
    sensitivity_factor = 1

    @classmethod
    def release_event(cls, noise_multiplier):
        """The event of a one-off Gaussian release of a sum over the whole data set (statistics before training).

        ``noise_multiplier`` is the noise std over the sum's add-or-remove-one
        sensitivity; under this sampler's adjacency the sensitivity is
        ``sensitivity_factor`` times that.
        """
        return dp_accounting.GaussianDpEvent(float(noise_multiplier) / cls.sensitivity_factor)

    @staticmethod
    def accounting_unit(steps_per_epoch):
        """How many steps the accountant counts as one: epsilon changes, and training may stop, only at multiples."""
        del steps_per_epoch
        return 1

    @staticmethod
    def epoch_length(dataset_size, batch_size):
        raise NotImplementedError

    @classmethod
    def dp_event(cls, *, sampling_rate, noise_multiplier, steps, steps_per_epoch):
        """The ``DpEvent`` of ``steps >= 1`` noisy steps drawn by this kind of sampler."""
        raise NotImplementedError

    def _init_seeds(self, seed):
        self.seed = seed
        self._seeds = np.random.SeedSequence(seed)

    def _fresh_rng(self, pipeline=0, pipelines=1):
        """A new generator for one iteration of one input pipeline (pipelines never share a stream)."""
        return np.random.default_rng(self._seeds.spawn(1)[0].spawn(pipelines)[pipeline])

    def dataset(self):
        """Infinite ``tf.data.Dataset`` of ``(x_batch, y_batch)``, one element per step (one device)."""
        return self._pipeline_dataset(pipeline=0, pipelines=1, replicas=1)

    def distributed_dataset(self, strategy):
        """The batches for ``strategy``'s replicas: each pipeline draws from its shards (see the module docstring).

        Returns a ``tf.distribute.DistributedDataset`` whose global step
        gathers one element per replica; ``fit`` on a model built in
        ``strategy.scope()`` consumes it.
        """
        replicas = strategy.num_replicas_in_sync

        def pipeline_dataset(context):
            pipelines = context.num_input_pipelines
            if replicas % pipelines:
                raise ValueError(f"{replicas} replicas do not split evenly over {pipelines} input pipelines")
            return self._pipeline_dataset(context.input_pipeline_id, pipelines, replicas // pipelines)

        self._check_replicas(replicas)
        return strategy.distribute_datasets_from_function(pipeline_dataset)

    def _check_replicas(self, replicas):
        """Raises if this sampler cannot feed ``replicas`` replicas."""

    def _pipeline_dataset(self, pipeline, pipelines, replicas):
        """Infinite dataset of input pipeline ``pipeline`` (of ``pipelines``): per step, one element per local replica.

        Local replica ``j`` owns the shard ``arange(N)[pipeline::pipelines][j::replicas]``.
        """
        shards = [np.arange(self.dataset_size)[pipeline::pipelines][j::replicas] for j in range(replicas)]
        share = self._element_batch_size(pipelines * replicas)

        def batches():
            rng = self._fresh_rng(pipeline, pipelines)
            for step in self.shard_batches(rng, shards, share):
                yield from step

        return _batch_dataset(batches, self.x, self.y, share)

    def shard_batches(self, rng, shards, share):
        """Yields forever, per step, the indices each shard contributes to the batch (``share`` each, if fixed)."""
        raise NotImplementedError

    def _element_batch_size(self, replicas):
        """The static size of each replica's part of a batch (``None`` when it varies)."""
        return None


@register_sampler
class PoissonSampler(Sampler):
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
    adjacency = "adding or removing one example"

    @staticmethod
    def epoch_length(dataset_size, batch_size):
        """``ceil(N / B)`` for an expected batch size ``B = q N``: ``E`` epochs are at least ``E`` expected passes.

        ``N = 60,000, B = 256`` gives 235 steps (``1 / q = 234.375``). ``N / B``
        is rounded to 9 decimals first, so an exact ratio such as 10 is not
        pushed to 11 by float rounding. ``E`` epochs are ``E * epoch_length``
        steps everywhere (sampler, accounting, CLI).
        """
        return max(1, math.ceil(round(dataset_size / batch_size, 9)))

    @classmethod
    def dp_event(cls, *, sampling_rate, noise_multiplier, steps, steps_per_epoch=None):
        """``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``: amplification by subsampling."""
        step = dp_accounting.PoissonSampledDpEvent(
            float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        )
        return dp_accounting.SelfComposedDpEvent(step, int(steps))

    @classmethod
    def with_batch_size(cls, x, y, batch_size, seed=None):
        return cls(x, y, expected_batch_size=batch_size, seed=seed)

    @classmethod
    def schedule(cls, dataset_size, batch_size):
        """What :meth:`lipdp.policy.PrivacyPolicy.plan` needs of a sampler with this expected batch size."""
        rate = batch_size / dataset_size
        return dict(
            sampling=cls.kind,
            dataset_size=dataset_size,
            sampling_rate=rate,
            expected_batch_size=rate * dataset_size,
            steps_per_epoch=cls.epoch_length(dataset_size, rate * dataset_size),
        )

    def __init__(self, x, y, *, sampling_rate=None, expected_batch_size=None, seed=None):
        self.x, self.y = check_data(x, y)
        self.dataset_size = len(self.x)
        if (sampling_rate is None) == (expected_batch_size is None):
            raise ValueError("give exactly one of sampling_rate and expected_batch_size")
        if expected_batch_size is not None:
            if not 0 < expected_batch_size <= self.dataset_size:
                raise ValueError(
                    f"expected_batch_size must be in (0, {self.dataset_size}], got {expected_batch_size!r}"
                )
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
        """``ceil(1 / q)``: at least one expected pass over the data (see :meth:`epoch_length`)."""
        return self.epoch_length(self.dataset_size, self.expected_batch_size)

    def sample_indices(self, rng, population=None):
        """Draws one batch: sorted indices, each included with probability q.

        The batch size is drawn from Binomial(n, q), then a uniform subset of
        that size, which has the same distribution as n independent coin flips.

        Args:
            rng: A ``np.random.Generator``.
            population: The indices to draw from (a replica's shard); all ``N`` by default.
        """
        population = np.arange(self.dataset_size) if population is None else np.asarray(population)
        size = rng.binomial(len(population), self.sampling_rate)
        return population[np.sort(rng.choice(len(population), size, replace=False))]

    def shard_batches(self, rng, shards, share):
        del share  # Poisson batch sizes vary
        while True:
            yield [self.sample_indices(rng, shard) for shard in shards]


@register_sampler
class ShuffleSampler(Sampler):
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
    adjacency = "replacing one example (fixed-size shuffled batches, no amplification by subsampling)"
    sensitivity_factor = 2

    @staticmethod
    def accounting_unit(steps_per_epoch):
        """A whole epoch: each epoch started is one event (see :meth:`dp_event`)."""
        if steps_per_epoch is None:
            raise PrivacyParameterError(
                "steps_per_epoch is required for sampling='shuffle' (epochs are what is composed)"
            )
        return int(steps_per_epoch)

    @staticmethod
    def epoch_length(dataset_size, batch_size):
        """``N // B`` full batches (the remainder is dropped)."""
        return dataset_size // batch_size

    @classmethod
    def dp_event(cls, *, sampling_rate, noise_multiplier, steps, steps_per_epoch):
        """Each epoch started is one ``Gaussian(sigma / 2)`` (replace-one: sensitivity ``2 C``).

        Within an epoch an example is in one batch only; no amplification is
        claimed (it would rest on the shuffle staying secret).
        """
        del sampling_rate
        epochs = -(-int(steps) // cls.accounting_unit(steps_per_epoch))
        return dp_accounting.SelfComposedDpEvent(cls.release_event(noise_multiplier), epochs)

    @classmethod
    def with_batch_size(cls, x, y, batch_size, seed=None):
        return cls(x, y, batch_size=batch_size, seed=seed)

    @classmethod
    def schedule(cls, dataset_size, batch_size):
        """What :meth:`lipdp.policy.PrivacyPolicy.plan` needs of a sampler with this batch size."""
        return dict(
            sampling=cls.kind,
            dataset_size=dataset_size,
            sampling_rate=batch_size / dataset_size,
            expected_batch_size=batch_size,
            steps_per_epoch=cls.epoch_length(dataset_size, batch_size),
        )

    def __init__(self, x, y, *, batch_size, seed=None):
        self.x, self.y = check_data(x, y)
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
        """Full batches per epoch, ``N // batch_size`` (see :meth:`epoch_length`)."""
        return self.epoch_length(self.dataset_size, self.batch_size)

    def epoch_indices(self, rng, population=None, batch_size=None):
        """Draws one epoch: an int array of shape ``(steps_per_epoch, batch_size)`` of distinct indices.

        Args:
            rng: A ``np.random.Generator``.
            population: The indices to shuffle (a replica's shard); all ``N`` by default.
            batch_size: The examples per step taken from ``population``; the batch size by default.
        """
        population = np.arange(self.dataset_size) if population is None else np.asarray(population)
        batch_size = self.batch_size if batch_size is None else batch_size
        used = self.steps_per_epoch * batch_size
        return rng.permutation(population)[:used].reshape(self.steps_per_epoch, batch_size)

    def _check_replicas(self, replicas):
        if self.batch_size % replicas:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over {replicas} replicas: choose a multiple "
                "(each replica takes batch_size / replicas examples of its shard per step)"
            )

    def _element_batch_size(self, replicas):
        return self.batch_size // replicas

    def shard_batches(self, rng, shards, share):
        """Each epoch, every shard is shuffled and gives ``share = B / R`` examples per step (``N // B`` steps).

        A shard holds at least ``floor(N / R) >= (N // B) B / R`` examples, so
        every shard fills every step of the epoch.
        """
        while True:
            epochs = [self.epoch_indices(rng, shard, share) for shard in shards]
            yield from zip(*epochs)
