"""Peak memory of one clipless DP step against the batch size, with and without micro-batching.

Each measurement runs in a fresh process (peak RSS is per process): the
Lipschitz CNN of ``configs/mnist_conv.yaml`` takes 3 private steps on random
28x28x1 batches of the given size (``train_on_batch`` on a model made
unaccountable: a measurement, not a private run), and the process reports its
peak resident set size (``ru_maxrss``). Writes JSON with the machine and the
command.

    python experiments/bench_memory.py --batches 256 1024 4096 --microbatch 256 --out runs/bench_memory.json
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

from lipdp import keras  # first of TensorFlow: the Keras 2 API lipdp runs on (lipdp.backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_measurement(batch, microbatch):
    import numpy as np

    import lipdp
    from lipdp import config as config_lib
    from lipdp import training

    cfg = config_lib.load(os.path.join(ROOT, "configs", "mnist_conv.yaml"))
    model = lipdp.DPSequential(training.build_layers(cfg, (28, 28, 1)), microbatch_size=microbatch)
    model.compile(keras.optimizers.Adam(1e-3), loss=lipdp.losses.TauCategoricalCrossentropy(16.0))
    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    model.make_private(lipdp.PoissonSampler(x, y, sampling_rate=1.0), noise_multiplier=1.0)
    model.allow_unaccounted_steps()
    for _ in range(3):
        model.train_on_batch(x, y)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--microbatch", type=int, default=256)
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: batch, microbatch (0: none)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_measurement(args.one[0], args.one[1] or None)))
        return
    rows = []
    for batch in args.batches:
        for microbatch in (0, args.microbatch):
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(batch), str(microbatch)],
                capture_output=True,
                text=True,
                check=True,
            )
            peak = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"batch": batch, "microbatch": microbatch or None, "peak_rss_mib": round(peak, 1)})
            print(rows[-1], flush=True)
    info = {"machine": platform.platform(), "nproc": os.cpu_count(), "command": " ".join([sys.executable] + sys.argv)}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"info": info, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
