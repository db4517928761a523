"""Step time and peak memory against batch size: non-private, clipless DP, clipping DP (ours and tensorflow_privacy's).

The measurements are those of ``experiments/bench_clipping.py`` (reused, not
duplicated: its methods, networks and per-method subprocesses), here
collected into ``--out``: a table with the ratios to non-private training at
each batch size (``speed.csv``, ``speed.json``) and a plot of step time and
peak memory against batch size (``speed.png``).

Methods (see ``bench_clipping.py``): ``nonprivate`` (plain CNN), ``clipless``
(its Lipschitz counterpart, lipdp's clipless DP), ``fast_clipping``
(``lipdp.DPSequential(mechanism="flat")`` on the plain CNN, fast per-example
norms), ``tfp_dpsgd`` (tensorflow_privacy's ``DPKerasSGDOptimizer``, one
microbatch per example). Memory is the process's peak resident set size on
CPU (see ``bench_clipping.py`` for what it does and does not measure).

    python experiments/speed.py --out runs/speed                 # batch sizes 32..1024
    python experiments/speed.py --quick --out /tmp/speed         # batch sizes 32 and 128, 5 steps
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_clipping  # noqa: E402  (the measurements)
import privacy_utility as common  # noqa: E402  (banner, tables)

QUICK_BATCHES = (32, 128)  # tensorflow_privacy's step grows as batch^2: 256 alone takes about a minute on 2 cores


def with_ratios(rows):
    """Adds ``time_ratio`` and ``memory_ratio`` (to ``nonprivate`` at the same batch size) to each row."""
    reference = {row["batch"]: row for row in rows if row["method"] == "nonprivate"}
    out = []
    for row in rows:
        base = reference.get(row["batch"])
        out.append(
            {
                **row,
                "ms_per_step": 1e3 * row["median_step_s"],
                "time_ratio": row["median_step_s"] / base["median_step_s"] if base else None,
                "memory_ratio": row["peak_rss_mib"] / base["peak_rss_mib"] if base else None,
            }
        )
    return out


def plot(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(figure)
    for position, (key, label) in enumerate(
        (("ms_per_step", "median step time (ms)"), ("peak_rss_mib", "peak RSS (MiB, process)"))
    ):
        axes = figure.add_subplot(1, 2, position + 1)
        common.plot_methods(axes, rows, "batch", key, "batch size", label)
        axes.set_yscale("log" if key == "ms_per_step" else "linear")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"batch sizes {QUICK_BATCHES}, 5 steps")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (default 32..1024)")
    parser.add_argument("--methods", nargs="*", default=list(bench_clipping.METHODS), choices=bench_clipping.METHODS)
    parser.add_argument("--steps", type=int, help="timed steps per batch size (default 10, quick 5)")
    parser.add_argument(
        "--max-step-seconds",
        type=float,
        default=20.0,
        help="skip a method's larger batch sizes once its median step exceeds this",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    info = common.banner()
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "bench_clipping.json")
    bench_args = ["--out", raw, "--methods", *args.methods, "--max-step-seconds", str(args.max_step_seconds)]
    batches = args.batches or (QUICK_BATCHES if args.quick else None)
    bench_args += ["--quick"] if args.quick else []
    bench_args += ["--batches", *map(str, batches)] if batches else []
    bench_args += ["--steps", str(args.steps)] if args.steps else []
    bench_clipping.main(bench_args)
    with open(raw) as handle:
        measured = json.load(handle)

    rows = with_ratios(measured["rows"])
    print("\nratios to non-private training at the same batch size:")
    common.print_table(rows, ["method", "batch", "ms_per_step", "time_ratio", "peak_rss_mib", "memory_ratio"])
    common.write_rows(os.path.join(args.out, "speed.csv"), rows)
    common.write_json(
        os.path.join(args.out, "speed.json"), {**info, "bench_machine": measured["machine"], "rows": rows}
    )
    plot(rows, os.path.join(args.out, "speed.png"))
    print(f"results in {args.out}/speed.{{csv,json,png}}")


if __name__ == "__main__":
    main()
