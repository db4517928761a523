"""Calibration (ECE) of clipless DP against clipping with a small and a large clipping norm, at one epsilon.

Bu et al. (2021) report that DP-SGD with per-example clipping makes models
over-confident, the more so with a small clipping norm. All runs here are
``lipdp.training.run`` of one config with the same noise multiplier (so the
same epsilon); the clipping runs train the same layers with
``model.mechanism.name = flat`` (or ``--rules``) at each ``--clip-norms`` value.
ECE uses 15 equal-width bins on the test set and the probabilities of the
loss (``softmax(tau * logits)``, :func:`lipdp.calibration.predicted_probabilities`).

    python experiments/calibration.py --out runs/calibration
    python experiments/calibration.py --quick --out /tmp/calibration
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import privacy_utility as common  # noqa: E402  (banner, runs, tables shared by the experiments)


def run_methods(args):
    """``[(name, overrides)]``: clipless, then each clipping rule at each norm."""
    return [("clipless", [])] + [
        (
            f"{rule} R={norm:g}",
            common.clipping_overrides(common.config_path(args), rule, f"model.mechanism.clip_norm={norm}"),
        )
        for rule in args.rules
        for norm in args.clip_norms
    ]


def plot_ece(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar([r["method"] for r in rows], [r["ece"] for r in rows], color="C0")
    axes.set_ylabel("expected calibration error (test)")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--config", help="config file (default configs/<dataset>.yaml)")
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--rules", nargs="+", default=["flat"], help="clipping rules: flat, automatic, global")
    parser.add_argument("--clip-norms", type=float, nargs="+", default=[0.1, 10.0], help="small and large R")
    parser.add_argument("--epochs", type=int, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from lipdp import calibration, config, data, runs

    info = common.banner()
    if args.quick:
        args.epochs = args.epochs or 3
    args.epochs = args.epochs or config.load(common.config_path(args)).training.epochs
    overrides = common.base_overrides(args)
    cfg = config.load(common.config_path(args), overrides)
    dataset = data.load_configured(cfg.dataset)
    print(f"data: {dataset.source}")
    sigma = common.shared_noise_multiplier(cfg, dataset, args.epsilon)
    noise = ["privacy.target_epsilon=null", f"privacy.noise_multiplier={sigma!r}"]
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for name, extra in run_methods(args):
        run_dir = os.path.join(args.out, "runs", name.replace(" ", "-").replace("=", ""))
        metrics, privacy = common.private_run(common.config_path(args), overrides + noise + extra, run_dir)
        model = runs.load_run(run_dir).model
        probs = calibration.predicted_probabilities(model, dataset.x_test)
        rows.append(
            {
                "method": name,
                "epsilon": privacy["epsilon"],
                "delta": privacy["delta"],
                "test_accuracy": metrics["test_accuracy"],
                "mean_confidence": float(probs.max(axis=1).mean()),
                "ece": calibration.expected_calibration_error(probs, dataset.y_test),
                "run_dir": run_dir,
            }
        )
        figure = calibration.plot_reliability(probs, dataset.y_test)
        figure.suptitle(name, fontsize=10)
        figure.tight_layout()
        figure.savefig(os.path.join(args.out, f"reliability-{os.path.basename(run_dir)}.png"), dpi=100)
        print(f"  {name:<14} accuracy={rows[-1]['test_accuracy']:.4f} ECE={rows[-1]['ece']:.4f}", flush=True)

    common.print_table(rows, ["method", "epsilon", "test_accuracy", "mean_confidence", "ece"])
    common.write_rows(os.path.join(args.out, "calibration.csv"), rows)
    common.write_json(
        os.path.join(args.out, "calibration.json"),
        {**info, "data": dataset.source, "epochs": args.epochs, "rows": rows},
    )
    plot_ece(rows, os.path.join(args.out, "calibration.png"))
    print(f"results in {args.out}/calibration.{{csv,json,png}} and reliability-*.png")


if __name__ == "__main__":
    main()
