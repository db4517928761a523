"""Private training on several devices or machines with ``tf.distribute``.

Build and compile the DP model inside ``strategy.scope()``, then train as on
one device::

    strategy = tf.distribute.MirroredStrategy()          # or MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = lipdp.DPSequential([...])
        model.compile(optimizer="adam", loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    model.make_private(sampler, target_epsilon=3.0, epochs=20, delta=1e-5)
    model.fit(sampler, epochs=20)

What one global step does, and why the guarantee is the single-device one:

* **Sampling.** Each replica draws its part of the batch from its own fixed
  shard of the data (:mod:`lipdp.sampling`): independent Poisson(q) draws on
  disjoint shards are one Poisson(q) draw over the whole data set, so the
  accountant records the same event as on one device.
* **Gradient.** Each replica computes the gradient *sum* of its examples and
  the certified bounds from the same mirrored weights (the bounds depend on
  the weights only), and divides by the global expected batch size ``q N``;
  the optimizer's all-reduce adds the replicas' parts.
* **Noise, exactly once.** Only the first replica of the global step adds
  noise (:func:`noise_mask`), with the single-device standard deviation
  ``sigma C``: the all-reduced update carries one draw, whatever the number
  of replicas, and no assumption about the independence of the replicas'
  random streams is needed. ``C`` is the largest of the replicas' bounds
  (:func:`largest_over_replicas`; equal while the mirrored copies agree).
* **Counting.** ``privacy_steps`` is updated once per global step (its value
  on the first replica), so checkpoints, ``BudgetStop`` and the ledger count
  global steps.

Create one strategy per process (TensorFlow's collective ops of two
``MirroredStrategy`` objects share keys and can clash).

Only synchronous strategies whose replicas all-reduce every step are
accepted (:func:`check_strategy`); asynchronous parameter-server training
would apply updates computed on stale weights whose bounds were never
certified, and is refused.
"""

import contextlib
import os

import tensorflow as tf

from lipdp.errors import ConfigError, ModelNotSupportedError

#: The ``training.strategy`` config values.
STRATEGIES = ("none", "mirrored", "multi_worker")

_SYNCHRONOUS = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.OneDeviceStrategy,
)


def strategy_of(model):
    """The ``tf.distribute.Strategy`` ``model`` was built under, or ``None`` (one device, no strategy)."""
    strategy = model.distribute_strategy
    with strategy.scope():  # the default strategy's scope is no strategy
        return strategy if tf.distribute.has_strategy() else None


def refuse_releases_across_workers(model, releases):
    """Raises :class:`ModelNotSupportedError` if ``model`` carries data ``releases`` under multi-worker training.

    Each worker builds its own model: a release drawn on each worker is one release per worker of the same
    data, while the accountant (one per worker, each counting its own model's layers) counts one.
    """
    if releases and isinstance(strategy_of(model), tf.distribute.MultiWorkerMirroredStrategy):
        raise ModelNotSupportedError(
            f"the model carries {len(releases)} data release(s) (e.g. a released ChannelStandardization) under "
            "MultiWorkerMirroredStrategy: each worker would draw its own release of the same data and the "
            "accountant would count one. Train with released statistics on one machine (mirrored devices)"
        )


def scope(strategy):
    """``strategy.scope()``, or nothing for ``None`` (one device): build and compile models in it."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def on_one_replica(model, fn, *args):
    """``fn(*args)`` for a model's diagnostics: on its first local replica under a strategy (mirrored variables
    can only be differentiated there), directly without one."""
    strategy = strategy_of(model)
    if strategy is None:
        return fn(*args)
    return tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], strategy.run(fn, args))


def check_strategy(strategy):
    """Raises :class:`ModelNotSupportedError` unless ``strategy`` (or ``None``) keeps the guarantee."""
    if strategy is None or isinstance(strategy, _SYNCHRONOUS):
        return
    raise ModelNotSupportedError(
        f"{type(strategy).__name__} is not supported for private training: lipdp needs synchronous replicas that "
        "all-reduce every step (each step's bounds certified for the weights it is applied to, noise added once "
        "to the global sum); use MirroredStrategy (devices of one machine) or MultiWorkerMirroredStrategy "
        "(several machines)"
    )


def noise_mask():
    """1.0 on the first replica of the global step (and without a strategy), 0.0 on the others (float64).

    Multiplies the noise each replica would add, so the all-reduced sum
    holds exactly one draw.
    """
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.cast(tf.equal(replica_id, 0), tf.float64)


def largest_over_replicas(values):
    """Each value's maximum over the replicas of the step (the values themselves without a strategy).

    The noise standard deviations of a step are taken at their largest over
    the replicas: each replica bounds the examples it holds with the weights
    it holds, and mirrored copies that drifted apart (a non-deterministic
    constraint or kernel) must not leave one replica's examples under-covered.
    """
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync == 1:
        return values
    gathered = context.all_gather(tf.stack(values)[None], axis=0)
    return tf.unstack(tf.reduce_max(gathered, axis=0), num=len(values))


def make_strategy(kind, logical_cpus=None):
    """The strategy of the config value ``kind`` (see :data:`STRATEGIES`); ``None`` for ``"none"``.

    ``logical_cpus``: on a machine without GPUs, split the CPU into that many
    logical devices first (a test or a demonstration of MirroredStrategy on a
    CPU; it must happen before TensorFlow initialises its devices).
    ``"multi_worker"`` reads the cluster from the ``TF_CONFIG`` environment
    variable, as TensorFlow does.
    """
    if kind not in STRATEGIES:
        raise ConfigError(f"training.strategy: {kind!r} is not one of {', '.join(STRATEGIES)}")
    if logical_cpus is not None:
        split_cpu(logical_cpus)
    if kind == "none":
        return None
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise ConfigError(
            "training.strategy: multi_worker needs the TF_CONFIG environment variable (the cluster and this "
            "worker's task), as tf.distribute.MultiWorkerMirroredStrategy reads it"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def split_cpu(count):
    """Splits the first CPU into ``count`` logical devices (before TensorFlow initialises them)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"training.logical_cpus: must be a positive integer, got {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise ConfigError(
            f"training.logical_cpus: cannot split the CPU into {count} devices once TensorFlow has initialised "
            "them; set it in a fresh process, before any model is built"
        ) from error


def is_chief(strategy=None):
    """Whether this process writes the run's artefacts: always without a cluster, else the chief (worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0
