"""Step time of clipless DP training against non-private training of the same model.

Both train the same Lipschitz CNN (the architecture of ``configs/mnist_conv.yaml``)
on the same random 28x28x1 batches with ``train_on_batch``; the only
difference is the train step: Keras' default (mean loss, no noise) versus
lipdp's (summed loss, certified bounds computed from the weights, Gaussian
noise). Reports the median step time over ``--steps`` steps after warm-up and
the ratio DP / non-DP for each batch size.

    python experiments/bench_step.py --out runs/bench_step.json
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
from lipdp import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lipschitz_layers():
    return training.build_layers(config_lib.load(os.path.join(ROOT, "configs", "mnist_conv.yaml")), (28, 28, 1))


def make_model(private, x, y):
    tf.keras.utils.set_random_seed(0)
    cls = lipdp.DPSequential if private else tf.keras.Sequential
    model = cls(lipschitz_layers())
    model.compile(tf.keras.optimizers.Adam(1e-3), loss=lipdp.losses.TauCategoricalCrossentropy(16.0))
    if private:
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=len(x) // 10), noise_multiplier=1.0)
        model.allow_unaccounted_steps()  # timed on a fixed batch: no accounting
    return model


def median_step_seconds(model, xb, yb, steps, warmup=5):
    for _ in range(warmup):
        model.train_on_batch(xb, yb)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    n = max(args.batch_sizes) * 10
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = tf.one_hot(rng.integers(0, 10, n), 10).numpy()
    plain, private = make_model(False, x, y), make_model(True, x, y)
    rows = []
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, TF {tf.__version__}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"{'batch':>6} {'non-DP ms':>10} {'clipless DP ms':>15} {'ratio':>6}")
    for batch in args.batch_sizes:
        xb, yb = x[:batch], y[:batch]
        a = median_step_seconds(plain, xb, yb, args.steps)
        b = median_step_seconds(private, xb, yb, args.steps)
        rows.append({"batch_size": batch, "non_dp_s": a, "clipless_dp_s": b, "ratio": b / a})
        print(f"{batch:>6} {a * 1e3:>10.2f} {b * 1e3:>15.2f} {b / a:>6.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
