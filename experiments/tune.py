"""Hyper-parameter search on a validation split carved from the *training* data (never the test split).

Every trial is one ``lipdp.training.run`` of ``--config`` with the base
overrides, one combination of the ``--grid`` values, and
``dataset.validation_fraction`` set, so the last fraction of the training
examples is the held-out set and the real test split is never loaded into a
decision. Each trial is written to ``--out/trials.csv`` as it finishes
(validation accuracy, epsilon, wall time, the overrides); the best trial is
printed with the ``--set`` overrides to reuse. Searching on private data is
not covered by the privacy guarantee: the README says how many trials chose
each shipped config.

    python experiments/tune.py --config configs/mnist.yaml --data-dir ../shared/data/mnist \\
        --grid model.layers.2.clip_value=0.05,0.1,0.2 --grid training.epochs=20,40 --out runs/tune_mnist
"""

import argparse
import csv
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import privacy_utility as common  # noqa: E402  (banner and run helpers shared by the experiments)


def parse_grid(items):
    """``["a.b=1,2", "c=x"]`` -> ``[("a.b", ["1", "2"]), ("c", ["x"])]``."""
    grid = []
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid expects KEY=V1,V2,..., got {item!r}")
        grid.append((key, values.split(",")))
    return grid


def set_layer_argument(cfg_layers, key, value):
    """``model.layers.I.ARG=V``: sets argument ARG of the I-th configured layer (YAML scalar ``V``)."""
    import yaml

    _, _, index, argument = key.split(".", 3)
    layers = [dict(layer) for layer in cfg_layers]
    layers[int(index)][argument] = yaml.safe_load(value)
    return layers


def trial_overrides(config_file, base, assignment):
    """The ``--set`` overrides of one trial (layer arguments rewritten as a whole ``model.layers``)."""
    from lipdp import config

    overrides = list(base)
    layers = None
    for key, value in assignment:
        if key.startswith("model.layers."):
            layers = set_layer_argument(layers or config.load(config_file, base).model.layers, key, value)
        else:
            overrides.append(f"{key}={value}")
    if layers is not None:
        overrides.append("model.layers=" + repr(layers).replace("'", ""))
    return overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base override")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values to search")
    parser.add_argument("--validation-fraction", type=float, default=0.125)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    info = common.banner()
    base = list(args.set) + [f"dataset.validation_fraction={args.validation_fraction}"]
    if args.data_dir:
        base.append(f"dataset.data_dir={args.data_dir}")
    grid = parse_grid(args.grid)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trials.csv")
    rows = []
    for number, values in enumerate(itertools.product(*(v for _, v in grid))):
        assignment = list(zip((k for k, _ in grid), values))
        overrides = trial_overrides(args.config, base, assignment)
        start = time.time()
        metrics, privacy = common.private_run(args.config, overrides, os.path.join(args.out, f"trial{number:03d}"))
        rows.append(
            {
                "trial": number,
                **dict(assignment),
                "validation_accuracy": metrics["test_accuracy"],
                "epsilon": privacy["epsilon"],
                "delta": privacy["delta"],
                "seconds": round(time.time() - start, 1),
                "data": metrics["data"],
                "overrides": " ".join(f"--set '{o}'" for o in overrides),
            }
        )
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(
            f"trial {number}: {dict(assignment)} validation accuracy {metrics['test_accuracy']:.4f} "
            f"({rows[-1]['seconds']} s)",
            flush=True,
        )
    best = max(rows, key=lambda r: r["validation_accuracy"])
    print(
        f"\n{len(rows)} trials on {info['machine']}; best validation accuracy {best['validation_accuracy']:.4f}: "
        f"{ {k: best[k] for k, _ in grid} }\nall trials: {path}"
    )


if __name__ == "__main__":
    main()
