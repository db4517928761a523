"""Step time and peak memory of DP training methods against batch size (CPU, one small CNN).

Methods, all through ``model.train_on_batch`` on the same batch (SGD, 28x28x1 inputs, 10 classes):

* ``nonprivate``: plain Keras model (Conv2D, Conv2D, Dense), no privacy;
* ``nonprivate_lipschitz``: the Lipschitz CNN below trained by plain Keras (no privacy): it
  separates the cost of the architecture (GroupSort, constraints) from that of the DP step;
* ``clipless``: lipdp's Lipschitz version of the same CNN (LipschitzConv2D, GroupSort,
  LipschitzDense), noise on certified bounds, no per-example work;
* ``fast_clipping``: ``lipdp.DPSequential(mechanism="flat")`` on the plain CNN (fast per-example
  norms + weighted second backward pass, :mod:`lipdp.clipping`);
* ``tfp_dpsgd``: tensorflow_privacy's ``DPKerasSGDOptimizer`` with
  ``num_microbatches = batch size`` (vectorised per-example Jacobians).

Time: median wall time of ``--steps`` steps after ``--warmup`` steps (tracing excluded).
Memory: ``tf.config.experimental.get_memory_info`` has no allocator statistics on CPU, so each
method runs in its own subprocess and the peak resident set size (``resource.getrusage``
``ru_maxrss``) is read after each batch size. Batch sizes run in ascending order, so the value at
batch ``b`` is the process peak over batch sizes ``<= b`` (memory grows with the batch); the
"delta" column subtracts the peak measured after building the model, before the first step.

Usage::

    python experiments/bench_clipping.py --quick --out runs/bench_clipping.json
    python experiments/bench_clipping.py --out runs/bench_clipping.csv   # 32..1024

tensorflow_privacy's optimizer takes ``tape.jacobian`` of the vector of per-example losses of the
whole batch: each of the ``B`` vectorised backward passes runs over all ``B`` examples (with zero
cotangents but for one), so its work grows as ``B^2`` -- hence its steep growth with the batch;
``--max-step-seconds`` skips a method's larger batch sizes once one step exceeds it.
Timings depend on the machine and on anything else running on it (shared CPUs make them noisy).
"""

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from lipdp import keras  # first of TensorFlow: the Keras 2 API lipdp runs on (lipdp.backend)

METHODS = ("nonprivate", "nonprivate_lipschitz", "clipless", "fast_clipping", "tfp_dpsgd")
FULL_BATCHES = (32, 64, 128, 256, 512, 1024)
QUICK_BATCHES = (32, 256)
INPUT_SHAPE, CLASSES = (28, 28, 1), 10


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def build(method, batch, dataset_size):
    """The compiled model for ``method`` and its per-step callable."""
    import numpy as np
    import tensorflow as tf

    import lipdp
    from lipdp import layers as L

    K = keras.layers
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(dataset_size,) + INPUT_SHAPE).astype("float32")
    y = tf.one_hot(rng.integers(0, CLASSES, dataset_size), CLASSES).numpy()
    plain = [
        keras.Input(INPUT_SHAPE),
        K.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        K.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        K.Flatten(),
        K.Dense(CLASSES),
    ]
    lipschitz = [
        keras.Input(INPUT_SHAPE),
        L.InputNormClip(1.0),
        L.LipschitzConv2D(16, 3, strides=2, bias_bound=1.0),
        L.GroupSort(),
        L.LipschitzConv2D(32, 3, strides=2, bias_bound=1.0),
        L.GroupSort(),
        L.Flatten(),
        L.LipschitzDense(CLASSES, bias_bound=1.0),
    ]
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=batch)
    if method == "nonprivate":
        model = keras.Sequential(plain)
        model.compile(keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    elif method == "nonprivate_lipschitz":
        model = keras.Sequential(lipschitz)
        model.compile(keras.optimizers.SGD(0.1), loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    elif method == "clipless":
        model = lipdp.DPSequential(lipschitz)
        model.compile(keras.optimizers.SGD(0.1), loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
        model.make_private(sampler, noise_multiplier=1.0)
        model.allow_unaccounted_steps()  # timed on a fixed batch: no accounting
    elif method == "fast_clipping":
        model = lipdp.DPSequential(plain, mechanism={"name": "flat", "clip_norm": 1.0})
        model.compile(keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        model.make_private(sampler, noise_multiplier=1.0)
        model.allow_unaccounted_steps()  # timed on a fixed batch: no accounting
    elif method == "tfp_dpsgd":
        try:
            from tensorflow_privacy import DPKerasSGDOptimizer
        except ImportError as error:
            raise SystemExit(
                "tfp_dpsgd needs the peer library tensorflow-privacy, which installs with TensorFlow <= 2.15 only: "
                "run this benchmark in make test-legacy's environment (.venv-legacy/bin/python)"
            ) from error

        model = keras.Sequential(plain)
        optimizer = DPKerasSGDOptimizer(
            l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=batch, learning_rate=0.1
        )
        model.compile(
            optimizer,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=keras.losses.Reduction.NONE),
        )
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    batch_x, batch_y = x[:batch], y[:batch]
    return lambda: model.train_on_batch(batch_x, batch_y)


def run_method(method, batches, warmup, steps, max_step_seconds, trace_dir=None):
    """Runs in a subprocess: one row per batch size (larger ones skipped once a step is too slow).

    With ``trace_dir``, each row also lists the op types that took the most time in a profiler
    trace of 10 more steps (``op_ms_per_step``, summed over the compute threads).
    """
    rows = []
    for batch in batches:
        if rows and rows[-1]["median_step_s"] > max_step_seconds:
            print(
                f"  {method:20s} batch {batch:5d}: skipped (a step took > {max_step_seconds} s at batch "
                f"{rows[-1]['batch']})",
                file=sys.stderr,
                flush=True,
            )
            continue
        step = build(method, batch, dataset_size=max(batches) * 2)
        before = _peak_rss_mib()
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "method": method,
                "batch": batch,
                "median_step_s": statistics.median(times),
                "min_step_s": min(times),
                "steps": steps,
                "peak_rss_mib": _peak_rss_mib(),
                "peak_rss_before_steps_mib": before,
            }
        )
        if trace_dir:
            import optrace

            events = optrace.record(step, os.path.join(trace_dir, f"{method}_{batch}"))
            rows[-1]["op_ms_per_step"] = dict(optrace.op_type_times(events))
            rows[-1]["op_ms_per_step_total"] = sum(ms for _, _, ms in events)
        print(
            f"  {method:20s} batch {batch:5d}: {1e3 * rows[-1]['median_step_s']:9.1f} ms/step",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"batch sizes {QUICK_BATCHES}, fewer steps")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (overrides --quick's)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, help="timed steps per config (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing)")
    parser.add_argument(
        "--max-step-seconds",
        type=float,
        default=20.0,
        help="skip a method's larger batch sizes once its median step exceeds this",
    )
    parser.add_argument("--out", help="write results here (.csv, otherwise JSON)")
    parser.add_argument("--trace", metavar="DIR", help="also profile 10 steps of each method and batch size here")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = tuple(sorted(args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)))
    steps = args.steps or (5 if args.quick else 10)

    if args._child:
        print(json.dumps(run_method(args._child, batches, args.warmup, steps, args.max_step_seconds, args.trace)))
        return

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print(f"machine: {machine}\ncommand: {command}", flush=True)
    rows = []
    for method in args.methods:
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--_child",
            method,
            "--batches",
            *map(str, batches),
            "--steps",
            str(steps),
            "--warmup",
            str(args.warmup),
            "--max-step-seconds",
            str(args.max_step_seconds),
            *(["--trace", args.trace] if args.trace else []),
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    machine["load_average_at_end"] = os.getloadavg()

    print(
        f"\n{'method':20s} {'batch':>5s} {'ms/step':>10s} {'ms/example':>10s} {'peak RSS MiB':>12s} {'delta MiB':>9s}"
    )
    for row in rows:
        print(
            f"{row['method']:20s} {row['batch']:5d} {1e3 * row['median_step_s']:10.1f} "
            f"{1e3 * row['median_step_s'] / row['batch']:10.3f} {row['peak_rss_mib']:12.0f} "
            f"{row['peak_rss_mib'] - row['peak_rss_before_steps_mib']:9.0f}"
        )
    reference = 256 if 256 in batches else batches[-1]
    at = {row["method"]: row for row in rows if row["batch"] == reference}
    ratios = {}
    if "tfp_dpsgd" in at:
        for method in ("nonprivate", "nonprivate_lipschitz", "clipless", "fast_clipping"):
            if method in at:
                ratios[f"tfp_dpsgd / {method}"] = at["tfp_dpsgd"]["median_step_s"] / at[method]["median_step_s"]
    if "nonprivate" in at:
        for method in ("fast_clipping", "tfp_dpsgd"):
            if method in at:
                ratios[f"{method} / nonprivate"] = at[method]["median_step_s"] / at["nonprivate"]["median_step_s"]
    if "nonprivate_lipschitz" in at and "clipless" in at:
        ratios["clipless / nonprivate_lipschitz"] = (
            at["clipless"]["median_step_s"] / at["nonprivate_lipschitz"]["median_step_s"]
        )
    print(
        f"\nstep-time ratios at batch {reference} (x faster than DPKerasSGDOptimizer / x slower than non-private "
        "training of the same network):"
    )
    for name, value in ratios.items():
        print(f"  {name:34s} {value:7.2f}")
    print(
        f"load average (1, 5, 15 min) at start {machine['load_average_at_start']}, "
        f"at end {machine['load_average_at_end']}: other processes share these {machine['nproc']} CPUs"
    )

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".csv"):
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            with open(args.out[:-4] + ".meta.json", "w") as f:
                json.dump(
                    {"machine": machine, "command": command, "ratios_batch": reference, "ratios": ratios}, f, indent=2
                )
        else:
            with open(args.out, "w") as f:
                json.dump(
                    {"machine": machine, "command": command, "rows": rows, "ratios_batch": reference, "ratios": ratios},
                    f,
                    indent=2,
                )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
