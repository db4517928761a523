"""Test accuracy against epsilon: clipless DP, clipping baselines, and non-private training.

Every private run is a ``lipdp.training.run`` of one config (default
``configs/<dataset>.yaml``) with ``--set``-style overrides; its run folder is
kept under ``--out/runs/``. The noise multiplier for each target epsilon is
calibrated once and shared by all methods (same sampler, same steps, so the
same guarantee). Clipping baselines (``model.mechanism.name = flat | automatic |
global`` of :mod:`lipdp.clipping`) train the *same* layers with per-example
clipping to ``--clip-norm`` instead of certified bounds: only the gradient
mechanism differs. The non-private reference trains the same layers with
plain Keras on the same batch size and epochs.

    python experiments/privacy_utility.py --out runs/privacy_utility
    python experiments/privacy_utility.py --dataset mnist --data-dir ../shared/data/mnist --out runs/pu_mnist
    python experiments/privacy_utility.py --quick --out /tmp/pu

With only the official MNIST ``t10k`` files (as in ``../shared/data/mnist``)
the 10,000 test images are split 8,000 train / 2,000 test; the data line
printed (the loader's ``source``) says which split was used.
"""

import argparse
import csv
import json
import os
import platform
import sys

from lipdp import keras
from lipdp.clipping import rule_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers shared by the experiment scripts --------------------------------------------
def banner():
    """Prints the machine and the exact command; returns them for the results file."""
    import tensorflow as tf

    info = {
        "machine": platform.platform(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"machine: {info['machine']}, nproc={info['nproc']}, GPUs={info['gpus']}, TF {info['tensorflow']}")
    print(f"command: {info['command']}")
    return info


def plot_methods(axes, rows, x_key, y_key, xlabel, ylabel):
    """One line per method of ``rows`` (dicts), x on a log2 scale."""
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r[x_key], r[y_key]) for r in rows if r["method"] == method)
        axes.plot(*zip(*points), "o-", label=method)
    axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def write_rows(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path, content):
    with open(path, "w") as handle:
        json.dump(content, handle, indent=2)


def print_table(rows, columns):
    widths = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_cell(row[c]).rjust(w) for c, w in zip(columns, widths)))


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def base_overrides(args):
    """Overrides every run shares: data folder and the quick-mode model and epochs."""
    overrides = [f"training.epochs={args.epochs}", f"training.seed={args.seed}", f"sampling.seed={args.seed}"]
    if args.data_dir:
        overrides.append(f"dataset.data_dir={args.data_dir}")
    return overrides


def config_path(args):
    return args.config or os.path.join(ROOT, "configs", f"{args.dataset}.yaml")


def shared_noise_multiplier(cfg, dataset, epsilon):
    """The noise multiplier reaching ``epsilon`` after ``cfg``'s epochs (same for every method)."""
    from lipdp import accounting, sampling

    sampler = sampling.make_sampler(
        cfg.sampling.kind, dataset.x_train, dataset.y_train, batch_size=cfg.sampling.batch_size
    )
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else 0.1 / sampler.dataset_size
    return accounting.calibrate_noise_multiplier(
        target_epsilon=epsilon,
        delta=delta,
        sampling_rate=sampler.sampling_rate,
        steps=cfg.training.epochs * sampler.steps_per_epoch,
        accountant=cfg.privacy.accountant,
        sampling=sampler.kind,
        steps_per_epoch=sampler.steps_per_epoch,
    )


def private_run(config_file, overrides, out_dir):
    """``lipdp.training.run`` (or the finished run already in ``out_dir``): ``(metrics, privacy)``."""
    from lipdp import config, training

    if not os.path.exists(os.path.join(out_dir, "privacy.json")):
        training.run(config.load(config_file, overrides), out_dir, verbose=0)
    with open(os.path.join(out_dir, "metrics.json")) as a, open(os.path.join(out_dir, "privacy.json")) as b:
        return json.load(a), json.load(b)


def non_private_accuracy(cfg, dataset):
    """Test accuracy of the config's layers trained without privacy (plain Keras, same batch size / epochs)."""

    from lipdp import losses, training

    keras.utils.set_random_seed(cfg.training.seed)
    model = keras.Sequential(training.build_layers(cfg, dataset.input_shape))
    optimizer = keras.optimizers.get(
        {"class_name": cfg.optimizer.name, "config": {"learning_rate": cfg.optimizer.learning_rate}}
    )
    model.compile(optimizer, loss=getattr(losses, cfg.loss.type)(**cfg.loss.params), metrics=["accuracy"])
    model.fit(
        dataset.x_train, dataset.y_train, batch_size=cfg.sampling.batch_size, epochs=cfg.training.epochs, verbose=0
    )
    return float(model.evaluate(dataset.x_test, dataset.y_test, verbose=0)[1])


def clipping_overrides(config_file, rule, *extra):
    """Overrides that train ``config_file`` with clipping ``rule``: the same layers without ``ClipGradient``
    (a logit-level clip is a clipless lever; clipping models refuse its custom gradient)."""
    from lipdp import config

    layers = [spec for spec in config.load(config_file).model.layers if spec["type"] != "ClipGradient"]
    return [f"model.mechanism.name={rule}", f"model.layers={json.dumps(layers)}", *extra]


def methods(requested, config_file):
    """``[(name, overrides)]``: clipless, and the requested clipping rules."""
    rules = [m for m in requested if m in rule_names()]
    return [("clipless", [])] + [(rule, clipping_overrides(config_file, rule)) for rule in rules]


# -- this experiment ------------------------------------------------------------------------
def plot(rows, non_private, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if non_private is not None:
        axes.axhline(non_private, color="k", linestyle="--", label="non-private")
    plot_methods(axes, rows, "epsilon", "test_accuracy", "epsilon (spent)", "test accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits (default), mnist, fashion_mnist, cifar10")
    parser.add_argument("--data-dir", help="local folder with the dataset files")
    parser.add_argument("--config", help="config file (default configs/<dataset>.yaml)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["clipless", *rule_names()],
        help="clipless and any of flat, automatic, global",
    )
    parser.add_argument("--clip-norm", type=float, default=1.0, help="clipping threshold R of the baselines")
    parser.add_argument("--epochs", type=int, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="epsilon 1 and 8, 3 epochs, clipless and flat only")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from lipdp import config, data

    info = banner()
    if args.quick:
        args.epsilons, args.methods, args.epochs = [1.0, 8.0], ["clipless", "flat"], args.epochs or 3
    base_cfg = config.load(config_path(args))
    args.epochs = args.epochs or base_cfg.training.epochs
    overrides = base_overrides(args)
    cfg = config.load(config_path(args), overrides)
    dataset = data.load_configured(cfg.dataset)
    print(f"data: {dataset.source}")
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for epsilon in args.epsilons:
        sigma = shared_noise_multiplier(cfg, dataset, epsilon)
        for name, extra in methods(args.methods, config_path(args)):
            noise = [
                "privacy.target_epsilon=null",
                f"privacy.noise_multiplier={sigma!r}",
                f"model.mechanism.clip_norm={args.clip_norm}",
            ]
            run_dir = os.path.join(args.out, "runs", f"{name}-eps{epsilon:g}")
            metrics, privacy = private_run(config_path(args), overrides + noise + extra, run_dir)
            rows.append(
                {
                    "method": name,
                    "target_epsilon": epsilon,
                    "epsilon": privacy["epsilon"],
                    "delta": privacy["delta"],
                    "noise_multiplier": privacy["noise_multiplier"],
                    "test_accuracy": metrics["test_accuracy"],
                    "run_dir": run_dir,
                }
            )
            print(f"  {name:<10} eps={privacy['epsilon']:.3g} accuracy={metrics['test_accuracy']:.4f}", flush=True)
    non_private = non_private_accuracy(cfg, dataset)
    rows.append(
        {
            "method": "non-private",
            "target_epsilon": None,
            "epsilon": None,
            "delta": None,
            "noise_multiplier": None,
            "test_accuracy": non_private,
            "run_dir": "",
        }
    )

    print_table(rows, ["method", "target_epsilon", "epsilon", "noise_multiplier", "test_accuracy"])
    write_rows(os.path.join(args.out, "privacy_utility.csv"), rows)
    write_json(
        os.path.join(args.out, "privacy_utility.json"),
        {**info, "data": dataset.source, "epochs": args.epochs, "clip_norm": args.clip_norm, "rows": rows},
    )
    plot(rows[:-1], non_private, os.path.join(args.out, "privacy_utility.png"))
    print(f"results in {args.out}/privacy_utility.{{csv,json,png}}")


if __name__ == "__main__":
    main()
