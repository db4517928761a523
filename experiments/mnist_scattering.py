"""MNIST at epsilon 1, 2, 4, 8: clipless (configs/mnist.yaml) against automatic and flat clipping on the same features.

All methods use the scattering front-end and the linear Lipschitz head of
``configs/mnist.yaml`` and its sampling, epochs and optimizer; the clipping
runs drop the logit-level ``ClipGradient`` (clipping rules refuse it) and
clip whole per-example gradients instead (flat: ``R = --clip-norm``; automatic:
normalised). Each run is ``lipdp train`` (a run folder under ``--out``; a
finished run is reused), test accuracy on the split of the data loader (with
``../shared/data/mnist``: the first 8,000 official t10k images train, the last
2,000 test). Writes ``mnist_scattering.csv`` and ``mnist_scattering.png``.

    python experiments/mnist_scattering.py --data-dir ../shared/data/mnist --out runs/mnist_final
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import privacy_utility as common  # noqa: E402  (banner, runs, tables shared by the experiments)

CONFIG = os.path.join(common.ROOT, "configs", "mnist.yaml")
HEAD_WITHOUT_LOGIT_CLIP = "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 10}]"


def methods(clip_norm):
    return {
        "clipless": [],
        "automatic": ["model.mechanism.name=automatic", HEAD_WITHOUT_LOGIT_CLIP],
        "flat": ["model.mechanism.name=flat", f"model.mechanism.clip_norm={clip_norm}", HEAD_WITHOUT_LOGIT_CLIP],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--clip-norm", type=float, default=0.1, help="R of flat clipping (untuned)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    info = common.banner()
    rows = []
    for epsilon in args.epsilons:
        for method, extra in methods(args.clip_norm).items():
            run_dir = os.path.join(args.out, f"{method}_eps{epsilon:g}")
            overrides = [f"dataset.data_dir={args.data_dir}", f"privacy.target_epsilon={epsilon}"] + extra
            start, reused = time.time(), os.path.exists(os.path.join(run_dir, "privacy.json"))
            metrics, privacy = common.private_run(CONFIG, overrides, run_dir)
            seconds = None if reused else round(time.time() - start, 1)  # wall time only of runs trained now
            rows.append(
                {
                    "method": method,
                    "epsilon": privacy["epsilon"],
                    "delta": privacy["delta"],
                    "test_accuracy": metrics["test_accuracy"],
                    "seconds": seconds,
                    "run_dir": run_dir,
                    "data": metrics["data"],
                }
            )
            print(f"  {method:<10} eps={epsilon:g} accuracy={metrics['test_accuracy']:.4f}", flush=True)
    common.print_table(rows, ["method", "epsilon", "test_accuracy", "seconds"])
    common.write_rows(os.path.join(args.out, "mnist_scattering.csv"), rows)
    common.write_json(os.path.join(args.out, "mnist_scattering.json"), {"info": info, "rows": rows})
    from lipdp.calibration import new_figure

    figure = new_figure()
    common.plot_methods(figure.add_subplot(), rows, "epsilon", "test_accuracy", "epsilon", "test accuracy")
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "mnist_scattering.png"), dpi=100)


if __name__ == "__main__":
    main()
