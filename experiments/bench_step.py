"""Step time and peak memory of clipless DP training against two non-private baselines.

Methods, all timed with ``train_on_batch`` on the same random 28x28x1 batches (Adam, 10 classes):

* ``ordinary``: the network a user would otherwise train, of the same shape as the CNN of
  ``configs/mnist_conv.yaml``: Conv2D(16, 3) + ReLU + MaxPool(2), Conv2D(32, 3) + ReLU +
  MaxPool(2), Flatten, Dense(10), no constraints, Keras' cross-entropy; not private;
* ``lipschitz``: the Lipschitz CNN of ``configs/mnist_conv.yaml`` (input clip, LipschitzConv2D
  with orthogonal constraints, L2NormPooling2D as the activation, LipschitzDense) trained by
  plain Keras; not private;
* ``clipless``: the same Lipschitz CNN trained by lipdp (summed loss, certified bounds from the
  weights, Gaussian noise), whole batch;
* ``clipless_mb256``: the same with ``microbatch_size=256`` (only at batches above 256);
* ``clipless_groupsort``: lipdp's clipless DP on the CNN that ``configs/mnist_conv.yaml`` had
  before, with a GroupSort between each convolution and its norm pooling.

Time: one subprocess per batch size builds every method's model and times their steps in turns
(A, B, C, A, B, C, ...: load from other processes hits all methods alike); the median of ``--steps``
steps after 5 warm-up steps, and the fastest step. Memory: each (method, batch) runs in a subprocess
of its own; the peak resident set size (``ru_maxrss``) after ``--memory-steps`` steps, and its growth
over the peak after building the model, before the first step.

    python experiments/bench_step.py --out experiments/results/bench_step.json
    python experiments/bench_step.py --table experiments/results/bench_step.json   # the README table
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from lipdp import keras  # first of TensorFlow: the Keras 2 API lipdp runs on (lipdp.backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ordinary", "lipschitz", "clipless", "clipless_mb256", "clipless_groupsort")
INPUT_SHAPE, CLASSES = (28, 28, 1), 10


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def ordinary_layers():
    """The unconstrained CNN of the same shape as ``configs/mnist_conv.yaml``'s."""

    K = keras.layers
    return [
        keras.Input(INPUT_SHAPE),
        K.Conv2D(16, 3, padding="same", activation="relu"),
        K.MaxPooling2D(2),
        K.Conv2D(32, 3, padding="same", activation="relu"),
        K.MaxPooling2D(2),
        K.Flatten(),
        K.Dense(CLASSES),
    ]


def lipschitz_layers():
    from lipdp import config as config_lib
    from lipdp import training

    return training.build_layers(config_lib.load(os.path.join(ROOT, "configs", "mnist_conv.yaml")), INPUT_SHAPE)


def groupsort_lipschitz_layers():
    """The CNN of ``configs/mnist_conv.yaml`` with a GroupSort after each convolution (its form until 2026-11-23)."""
    from lipdp import layers as L

    layers = []
    for layer in lipschitz_layers():
        layers.append(layer)
        if isinstance(layer, L.LipschitzConv2D):
            layers.append(L.GroupSort())
    return layers


def make_model(method, x, y, batch):

    import lipdp

    keras.utils.set_random_seed(0)
    if method == "ordinary":
        model = keras.Sequential(ordinary_layers())
        model.compile(keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        return model
    loss = lipdp.losses.TauCategoricalCrossentropy(16.0)
    if method == "lipschitz":
        model = keras.Sequential(lipschitz_layers())
        model.compile(keras.optimizers.Adam(1e-3), loss=loss)
        return model
    microbatch = 256 if method == "clipless_mb256" else None
    layers = groupsort_lipschitz_layers() if method == "clipless_groupsort" else lipschitz_layers()
    model = lipdp.DPSequential(layers, microbatch_size=microbatch)
    model.compile(keras.optimizers.Adam(1e-3), loss=loss)
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=batch), noise_multiplier=1.0)
    model.allow_unaccounted_steps()  # timed on a fixed batch: no accounting
    return model


def _batch(batch):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.random((batch,) + INPUT_SHAPE, dtype=np.float32)
    return x, tf.one_hot(rng.integers(0, CLASSES, batch), CLASSES).numpy()


def measure_times(methods, batch, steps, warmup=5):
    """Runs in a subprocess: every method's model at one batch size, steps timed in turns (A, B, C, A, ...)."""
    x, y = _batch(batch)
    models = [make_model(method, x, y, batch) for method in methods]
    for model in models:
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = [[] for _ in methods]
    for _ in range(steps):
        for model, record in zip(models, times):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            record.append(time.perf_counter() - start)
    return {
        method: {"step_ms": 1e3 * statistics.median(t), "step_ms_min": 1e3 * min(t)}
        for method, t in zip(methods, times)
    }


def measure_memory(method, batch, steps):
    """Runs in a subprocess of its own: the peak RSS of ``steps`` steps of one method."""
    x, y = _batch(batch)
    model = make_model(method, x, y, batch)
    before = _peak_rss_mib()
    for _ in range(steps):
        model.train_on_batch(x, y)
    peak = _peak_rss_mib()
    return {"peak_rss_mib": peak, "rss_growth_mib": peak - before}


def _busy_processes():
    """Other processes using CPU now (nice, %CPU, command), to report alongside the timings."""
    out = subprocess.run(["ps", "-eo", "pid,ni,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()[1:]]
    return [
        {"nice": int(r[1]) if r[1].lstrip("-").isdigit() else r[1], "cpu_percent": float(r[2]), "command": r[3]}
        for r in rows
        if len(r) == 4 and float(r[2]) > 20.0 and int(r[0]) != os.getpid()
    ]


def markdown_table(results):
    """The README's performance table from a JSON file this script wrote (ratios recomputed from its rows)."""
    by_key = {(r["method"], r["batch_size"]): r for r in results["rows"]}
    lines = [
        "| batch | ordinary CNN ms | Lipschitz CNN ms | clipless DP ms | DP / ordinary (fastest steps) "
        "| DP / Lipschitz (fastest steps) | clipless DP with GroupSort / ordinary "
        "| peak RSS MiB: ordinary / Lipschitz / DP / DP micro-batches of 256 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(numerator, base):
        if numerator is None or base is None:
            return "-"
        return f"{numerator['step_ms'] / base['step_ms']:.2f} ({numerator['step_ms_min'] / base['step_ms_min']:.2f})"

    for batch in sorted({r["batch_size"] for r in results["rows"]}):
        ordinary, lipschitz, dp, micro, groupsort = (by_key.get((m, batch)) for m in METHODS)
        ms = ["-" if c is None else f"{c['step_ms']:.1f}" for c in (ordinary, lipschitz, dp)]
        ratios = [ratio(dp, ordinary), ratio(dp, lipschitz), ratio(groupsort, ordinary)]
        peaks = " / ".join("-" if c is None else f"{c['peak_rss_mib']:.0f}" for c in (ordinary, lipschitz, dp, micro))
        lines.append(f"| {batch} | " + " | ".join(ms + ratios) + f" | {peaks} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown table of a results file and exit")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory measurement")
    parser.add_argument("--times", nargs="+", metavar="BATCH METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as handle:
            print(markdown_table(json.load(handle)))
        return
    if args.times:
        print(json.dumps(measure_times(args.times[1:], int(args.times[0]), args.steps)))
        return
    if args.memory:
        print(json.dumps(measure_memory(args.memory[0], int(args.memory[1]), args.memory_steps)))
        return

    import tensorflow as tf

    command = " ".join(["python", "experiments/bench_step.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, TF {tf.__version__}")
    print(f"command: {command}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def run(*arguments):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *arguments, "--steps", str(args.steps)]
            + ["--memory-steps", str(args.memory_steps)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows, busy = [], []
    for batch in args.batch_sizes:
        methods = [m for m in args.methods if not (m == "clipless_mb256" and batch <= 256)]
        times = run("--times", str(batch), *methods)
        busy.append(_busy_processes())
        for method in methods:
            rows.append({"method": method, "batch_size": batch, **times[method], **run("--memory", method, str(batch))})
            print(
                f"{batch:>6} {method:>15} {rows[-1]['step_ms']:>9.2f} ms (fastest {rows[-1]['step_ms_min']:>8.2f})"
                f"  peak {rows[-1]['peak_rss_mib']:>7.0f} MiB",
                flush=True,
            )
    by_key = {(r["method"], r["batch_size"]): r for r in rows}
    ratios = []
    print(f"\n{'batch':>6} {'DP/ordinary':>12} {'DP/Lipschitz':>13} {'lip/ordinary':>13} {'mem DP/ord':>11}")
    for batch in args.batch_sizes:
        row = {"batch_size": batch}
        dp, lip, ordinary = (by_key.get((m, batch)) for m in ("clipless", "lipschitz", "ordinary"))
        if dp and ordinary:
            row["clipless_vs_ordinary"] = dp["step_ms"] / ordinary["step_ms"]
            row["clipless_vs_ordinary_fastest_step"] = dp["step_ms_min"] / ordinary["step_ms_min"]
            row["clipless_peak_vs_ordinary"] = dp["peak_rss_mib"] / ordinary["peak_rss_mib"]
        if dp and lip:
            row["clipless_vs_lipschitz"] = dp["step_ms"] / lip["step_ms"]
            row["clipless_vs_lipschitz_fastest_step"] = dp["step_ms_min"] / lip["step_ms_min"]
            row["clipless_peak_vs_lipschitz"] = dp["peak_rss_mib"] / lip["peak_rss_mib"]
        if lip and ordinary:
            row["lipschitz_vs_ordinary"] = lip["step_ms"] / ordinary["step_ms"]
        groupsort = by_key.get(("clipless_groupsort", batch))
        if groupsort and ordinary:
            row["clipless_groupsort_vs_ordinary"] = groupsort["step_ms"] / ordinary["step_ms"]
            row["clipless_groupsort_vs_ordinary_fastest_step"] = groupsort["step_ms_min"] / ordinary["step_ms_min"]
        mb = by_key.get(("clipless_mb256", batch))
        if mb and ordinary:
            row["clipless_mb256_vs_ordinary"] = mb["step_ms"] / ordinary["step_ms"]
            row["clipless_mb256_peak_vs_ordinary"] = mb["peak_rss_mib"] / ordinary["peak_rss_mib"]
        ratios.append(row)
        cells = [row.get(k) for k in ("clipless_vs_ordinary", "clipless_vs_lipschitz", "lipschitz_vs_ordinary")]
        cells.append(row.get("clipless_peak_vs_ordinary"))
        print(f"{batch:>6} " + " ".join(f"{'-' if c is None else f'{c:.3f}':>12}" for c in cells))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(
                {
                    "command": command,
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "tensorflow": tf.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "steps": args.steps,
                    "other_busy_processes": busy,
                    "rows": rows,
                    "ratios": ratios,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
