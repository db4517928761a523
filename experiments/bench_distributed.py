"""Step time and throughput of clipless DP training on one device and under MirroredStrategy.

Trains the Lipschitz CNN of ``configs/mnist_conv.yaml`` with ``fit(sampler)``
(Poisson batches, noise on) on random 28x28x1 data, once without a strategy
(one device) and once under ``tf.distribute.MirroredStrategy`` over every GPU,
or, on a machine without GPUs, over ``--logical-cpus`` logical CPU devices.
Reports the median time of a step (callback timestamps between consecutive
steps, after a warm-up epoch) and the examples per second at the expected
batch size.

    python experiments/bench_distributed.py --out experiments/results/bench_distributed.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import config as config_lib
from lipdp import distribute, keras, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepTimes(keras.callbacks.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls, from the second epoch on."""

    def on_train_begin(self, logs=None):
        self.times, self._last = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self._last = time.perf_counter() if epoch > 0 else None

    def on_train_batch_end(self, batch, logs=None):
        if self._last is not None:
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now


def timed_fit(strategy, x, y, batch_size, epochs):
    cfg = config_lib.load(os.path.join(ROOT, "configs", "mnist_conv.yaml"))
    with distribute.scope(strategy):
        keras.utils.set_random_seed(0)
        model = training.build_model(cfg, x.shape[1:])
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=batch_size)
    model.make_private(sampler, noise_multiplier=1.0, delta=1e-5)
    times = StepTimes()
    model.fit(sampler, epochs=epochs, verbose=0, callbacks=[times])
    return statistics.median(times.times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (the data set holds steps x batch)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--logical-cpus", type=int, default=2, help="devices to split the CPU into without GPUs")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        distribute.split_cpu(args.logical_cpus)
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, {len(gpus)} GPUs, TF {tf.__version__}"
    print(f"machine: {machine}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"{'batch':>6} {'setting':>22} {'ms/step':>9} {'examples/s':>11}")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        n = batch * args.steps
        x = rng.random((n, 28, 28, 1), dtype=np.float32)
        y = tf.one_hot(rng.integers(0, 10, n), 10).numpy()
        for name, chosen in (("one device", None), (f"mirrored x{len(devices)}", strategy)):
            seconds = timed_fit(chosen, x, y, batch, args.epochs)
            rows.append({"batch_size": batch, "setting": name, "step_s": seconds, "examples_per_s": batch / seconds})
            print(f"{batch:>6} {name:>22} {seconds * 1e3:>9.1f} {batch / seconds:>11.0f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"machine": machine, "devices": devices, "command": sys.argv, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
