"""Private training under tf.distribute: sampling by shards, one noise draw per global step, global counting.

The CPU is split into two logical devices by ``conftest.py`` (before TensorFlow
initialises), so ``MirroredStrategy`` runs two replicas here.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import distribute, runs, sensitivity
from lipdp import layers as L
from lipdp.errors import ConfigError, ModelNotSupportedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, FEATURES, CLASSES, SIGMA = 120, 16, 4, 0.7
COMPLETED_RUN = sorted(
    [runs.CONFIG, runs.HISTORY, runs.METRICS, runs.MODEL, runs.POLICY, runs.PRIVACY, runs.SENSITIVITY]
)
TWO_CPUS = ["/cpu:0", "/cpu:1"]


_MIRRORED = []


def mirrored():
    """One MirroredStrategy for the whole module.

    Each MirroredStrategy numbers its collective ops from the same keys, and
    TensorFlow's collective executor remembers an op's shape by key for the
    life of the process: a second strategy's op of another shape under a
    reused key fails ("Shape mismatch in the collective instance"). A
    training process holds one strategy; so do these tests.
    """
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(TWO_CPUS))
    return _MIRRORED[0]


def make_data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = tf.one_hot(rng.integers(0, CLASSES, n), CLASSES).numpy()
    return x, y


def make_model(strategy=None, **model_args):
    """A small model whose constraints never move the weights after a step (radius 1e3), SGD at lr 1."""
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        tf.keras.utils.set_random_seed(1)
        model = lipdp.DPSequential(
            [
                tf.keras.Input((FEATURES,)),
                L.InputNormClip(1.0),
                L.LipschitzDense(32, weight_constraint="frobenius", lipschitz_target=1e3, bias_bound=1e3),
                L.GroupSort(),
                L.LipschitzDense(CLASSES, weight_constraint="frobenius", lipschitz_target=1e3),
            ],
            **model_args,
        )
        model.compile(tf.keras.optimizers.SGD(1.0), loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
    return model


def full_batch_sampler(x, y):
    """q = 1: every step's batch is the whole data set, on one device or split over replicas."""
    return lipdp.PoissonSampler(x, y, sampling_rate=1.0)


def one_step_update(model, sampler, start):
    """The weights' change of one private step from ``start``."""
    model.set_weights(start)
    model.fit(sampler, epochs=1, verbose=0)
    return [after - before for after, before in zip(model.get_weights(), start)]


def without_noise(model):
    model.noise_stddevs = lambda sensitivity_: [tf.constant(0.0, tf.float64)] * len(model.trainable_variables)
    return model


def test_two_replicas_give_the_single_device_update_without_noise():
    x, y = make_data()
    single, replicated = without_noise(make_model()), without_noise(make_model(mirrored()))
    sampler = full_batch_sampler(x, y)
    for model in (single, replicated):
        model.make_private(sampler, noise_multiplier=SIGMA)
    start = single.get_weights()
    expected = one_step_update(single, sampler, start)
    found = one_step_update(replicated, sampler, start)
    assert max(np.abs(e).max() for e in expected) > 1e-3  # the step moved the weights
    for e, f in zip(expected, found):
        np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-6)


def _added_noise(model, sampler, start, gradient_sum, steps):
    """Noise in the all-reduced sum: SGD at lr 1 gives update = -(gradient sum + noise) / (q N)."""
    draws = []
    for _ in range(steps):
        update = one_step_update(model, sampler, start)
        draws.append(np.concatenate([(-u * N - g).ravel() for u, g in zip(update, gradient_sum)]))
    return np.concatenate(draws)


@pytest.mark.parametrize("strategy", [None, "mirrored"])
def test_one_noise_draw_per_global_step(strategy):
    """The aggregated noise has std sigma ||C|| on the sum, neither sqrt(2) too small nor too large."""
    x, y = make_data()
    sampler = full_batch_sampler(x, y)
    reference = without_noise(make_model())
    reference.make_private(sampler, noise_multiplier=SIGMA)
    start = reference.get_weights()
    bounds = np.array([float(b) for b in sensitivity.gradient_bound_tensors(reference)])  # at the start weights
    gradient_sum = [-u * N for u in one_step_update(reference, sampler, start)]

    model = make_model(mirrored() if strategy else None)
    model.make_private(sampler, noise_multiplier=SIGMA)
    noise = _added_noise(model, sampler, start, gradient_sum, steps=6)
    ratio = noise.std() / (SIGMA * np.linalg.norm(bounds))
    # 3,800 draws: the std is known to ~1.2%; a sqrt(2) mistake either way gives 0.71 or 1.41
    assert 0.95 < ratio < 1.05, ratio
    assert abs(noise.mean()) < 0.1 * noise.std()


def test_noise_scales_are_the_largest_over_replicas():
    strategy = mirrored()

    def replica_scales():
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float64)
        return tf.stack(distribute.largest_over_replicas([replica + 1.0, 5.0 - replica]))

    results = strategy.experimental_local_results(strategy.run(tf.function(replica_scales)))
    assert [r.numpy().tolist() for r in results] == [[2.0, 5.0], [2.0, 5.0]]
    assert distribute.largest_over_replicas([3.0]) == [3.0]  # no strategy: unchanged


def test_steps_and_epsilon_count_global_steps():
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=30)
    single, replicated = make_model(), make_model(mirrored())
    for model in (single, replicated):
        model.make_private(sampler, target_epsilon=4.0, epochs=2, delta=1e-3)
        history = model.fit(sampler, epochs=2, verbose=0)
    assert replicated.steps_taken == single.steps_taken == 2 * sampler.steps_per_epoch
    assert replicated.epsilon() == single.epsilon() <= 4.0
    assert history.history["epsilon"][-1] == replicated.epsilon()
    assert replicated.privacy_state()["steps"] == 2 * sampler.steps_per_epoch


def test_budget_stop_and_save_load_under_mirrored(tmp_path):
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=30)
    model = make_model(mirrored())
    model.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    budget = model.privacy.epsilon(5)
    model.fit(sampler, epochs=3, verbose=0, callbacks=[lipdp.callbacks.BudgetStop(budget, verbose=0)])
    assert model.steps_taken == model.privacy.max_steps(budget) == 5
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert loaded.steps_taken == 5 and loaded.epsilon() == model.epsilon()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def _replica_batches(sampler, strategy, steps):
    """Per step, each replica's indices (the data's first feature column holds the example's index)."""
    iterator = iter(sampler.distributed_dataset(strategy))
    steps_seen = []
    for _ in range(steps):
        xs, _ = next(iterator)
        steps_seen.append([x[:, 0].numpy().astype(int) for x in strategy.experimental_local_results(xs)])
    return steps_seen


def _indexed_data(n):
    x = np.repeat(np.arange(n, dtype="float32")[:, None], 3, axis=1)
    return x, np.zeros((n, 2), "float32")


def test_poisson_shards_form_one_poisson_draw():
    n, q, steps = 50, 0.3, 400
    sampler = lipdp.PoissonSampler(*_indexed_data(n), sampling_rate=q, seed=5)
    counts, sizes = np.zeros(n), []
    for step in _replica_batches(sampler, mirrored(), steps):
        first, second = step
        assert set(first) <= set(range(0, n, 2)) and set(second) <= set(range(1, n, 2))  # fixed, disjoint shards
        counts[np.concatenate(step)] += 1
        sizes.append(len(first) + len(second))
    # each example is included with probability q, independently: mean and variance of Binomial(n, q)
    assert np.all(np.abs(counts / steps - q) < 5 * np.sqrt(q * (1 - q) / steps))
    assert abs(np.mean(sizes) - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)
    assert 0.7 < np.var(sizes) / (n * q * (1 - q)) < 1.4


def test_shuffle_epochs_split_over_replicas():
    n, batch = 41, 10
    sampler = lipdp.ShuffleSampler(*_indexed_data(n), batch_size=batch, seed=2)
    steps = _replica_batches(sampler, mirrored(), 2 * sampler.steps_per_epoch)
    for epoch in (steps[: sampler.steps_per_epoch], steps[sampler.steps_per_epoch :]):
        seen = np.concatenate([np.concatenate(step) for step in epoch])
        assert all(len(part) == batch // 2 for step in epoch for part in step)
        assert len(seen) == len(set(seen)) == sampler.steps_per_epoch * batch  # at most once per epoch
    with pytest.raises(ValueError, match="split evenly over 2 replicas"):
        lipdp.ShuffleSampler(*_indexed_data(n), batch_size=9).distributed_dataset(mirrored())


def test_clipping_and_microbatches_train_under_mirrored():
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=40)
    for args in ({"mechanism": {"name": "automatic", "clip_norm": 1.0}}, {"microbatch_size": 8}):
        model = make_model(mirrored(), **args)
        model.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
        model.fit(sampler, epochs=1, verbose=0)
        assert model.steps_taken == sampler.steps_per_epoch
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_asynchronous_or_central_strategies_are_refused():
    parameter_server = tf.distribute.experimental.ParameterServerStrategy
    with pytest.raises(ModelNotSupportedError, match=r"ParameterServerStrategy\w* is not supported"):
        distribute.check_strategy(parameter_server.__new__(parameter_server))  # needs a cluster to construct
    x, y = make_data()
    model = make_model(tf.distribute.experimental.CentralStorageStrategy())
    with pytest.raises(ModelNotSupportedError, match="CentralStorageStrategy is not supported"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=30), noise_multiplier=1.0)


def test_strategy_config_values():
    assert distribute.make_strategy("none") is None
    assert isinstance(distribute.make_strategy("mirrored"), tf.distribute.MirroredStrategy)
    with pytest.raises(ConfigError, match="not one of none, mirrored, multi_worker"):
        distribute.make_strategy("parameter_server")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(ConfigError, match="once TensorFlow has initialised"):
        distribute.split_cpu(3)
    distribute.split_cpu(2)  # what conftest set: nothing to do
    assert distribute.is_chief(None) and distribute.is_chief(mirrored())


def test_adaptive_threshold_under_mirrored_matches_one_device(monkeypatch):
    """Without noise (mask 0), the replicas' summed counts move the threshold exactly as one device does."""
    monkeypatch.setattr(distribute, "noise_mask", lambda: tf.constant(0.0, tf.float64))
    x, y = make_data()
    sampler = full_batch_sampler(x, y)
    thresholds = []
    for strategy in (None, mirrored()):
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            tf.keras.utils.set_random_seed(1)
            model = lipdp.DPSequential(
                [tf.keras.Input((FEATURES,)), L.InputNormClip(1.0), L.LipschitzDense(CLASSES)]
                + [L.AdaptiveClipGradient(0.05, target_quantile=0.5)]
            )
            model.compile(tf.keras.optimizers.SGD(0.5), loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
        model.make_private(sampler, noise_multiplier=1.0, quantile_noise_share=0.2)
        model.fit(sampler, epochs=3, verbose=0)
        thresholds.append(float(model.layers[-1].threshold.numpy()))
    assert thresholds[0] != 0.05
    np.testing.assert_allclose(thresholds[1], thresholds[0], rtol=1e-5)


WORKER_JOB = """
import hashlib, sys
import numpy as np
from lipdp import config, training
cfg = config.load("configs/digits.yaml", ["training.strategy=multi_worker", "training.epochs=2"])
model, metrics = training.run(cfg, sys.argv[1], verbose=0)
weights = np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float32)
print("WEIGHTS", hashlib.sha256(weights.tobytes()).hexdigest(), model.steps_taken, flush=True)
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_train_one_run_on_loopback(tmp_path):
    """MultiWorkerMirroredStrategy, two processes on 127.0.0.1: identical weights, the chief's run folder."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    out = tmp_path / "run"
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER_JOB, str(out)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    results = [line.split()[1:] for output in outputs for line in output.splitlines() if line.startswith("WEIGHTS")]
    assert len(results) == 2 and results[0] == results[1], outputs  # identical weights, identical step counts
    privacy = json.loads((out / "privacy.json").read_text())
    steps_per_epoch = privacy["steps_per_epoch"]
    assert privacy["steps"] == int(results[0][1]) == 2 * steps_per_epoch  # each global step counted once
    assert sorted(p.name for p in out.iterdir()) == COMPLETED_RUN


class _Crash(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated crash")


def test_resume_from_backup_under_mirrored_counts_global_steps_once(tmp_path):
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=30)
    backup = tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    first = make_model(mirrored())
    first.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit(sampler, epochs=4, verbose=0, callbacks=[backup, _Crash()])
    assert first.steps_taken == 2 * sampler.steps_per_epoch
    resumed = make_model(mirrored())  # nothing but the backup survives
    resumed.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    resumed.fit(sampler, epochs=4, verbose=0, callbacks=[tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert resumed.steps_taken == 4 * sampler.steps_per_epoch
    assert resumed.epsilon() == resumed.privacy.epsilon(4 * sampler.steps_per_epoch)


def test_input_pipelines_draw_from_independent_streams_even_with_a_seed():
    """Workers sharing a sampler seed must not draw the same pattern on their shards (it would correlate them)."""
    n = 400
    sampler = lipdp.PoissonSampler(*_indexed_data(n), sampling_rate=0.5, seed=3)
    draws = []
    for pipeline in (0, 1):
        x, _ = next(iter(sampler._pipeline_dataset(pipeline, pipelines=2, replicas=1)))
        indices = x[:, 0].numpy().astype(int)
        assert np.all(indices % 2 == pipeline)  # example i belongs to pipeline i % 2
        draws.append(set(indices // 2))  # positions within the shard
    assert draws[0] != draws[1]


def test_cli_mirrored_run_writes_the_single_device_run_folder(tmp_path):
    """``lipdp train ... --set training.strategy=mirrored`` on two logical CPUs (a fresh process: one strategy)."""
    out = tmp_path / "run"
    sets = ["training.strategy=mirrored", "training.logical_cpus=2", "training.epochs=2"]
    command = [sys.executable, "-m", "lipdp.cli", "train", "configs/digits.yaml", "--out", str(out), "--verbose", "0"]
    done = subprocess.run(
        command + [a for s in sets for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == COMPLETED_RUN
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["steps"] == 2 * privacy["steps_per_epoch"] and privacy["epsilon"] <= 4.0
    assert "strategy: mirrored" in (out / "config.yaml").read_text()


RELEASE_UNDER_WORKERS_JOB = """
import numpy as np
import lipdp
import tensorflow as tf
from lipdp import layers as L
from lipdp.errors import ModelNotSupportedError

x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
y = np.eye(2, dtype="float32")[np.arange(64) % 2]
strategy = tf.distribute.MultiWorkerMirroredStrategy()  # no TF_CONFIG: one local worker
for release in (None, 8.0):
    with strategy.scope():
        layers = [L.ChannelStandardization(np.zeros(4), np.ones(4), 4.0, noise_multiplier=release)] if release else []
        model = lipdp.DPSequential([tf.keras.Input((4,)), *layers, L.InputNormClip(1.0), L.LipschitzDense(2)])
        model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    try:
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=16), noise_multiplier=1.0, delta=1e-3)
        print("ACCEPTED", release)
    except ModelNotSupportedError as error:
        print("REFUSED", release, error)
"""


def test_a_data_release_under_multi_worker_training_is_refused():
    """Every worker would draw its own release of the same data; the accountant would count one."""
    result = subprocess.run(
        [sys.executable, "-c", RELEASE_UNDER_WORKERS_JOB], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ACCEPTED", "REFUSED"))]
    assert lines[0] == "ACCEPTED None", result.stdout + result.stderr  # the same model without the release trains
    assert lines[1].startswith("REFUSED 8.0") and "each worker would draw its own release" in lines[1]
