"""How much of a trained DP linear head's kernel is accumulated noise (issue 20).

The loss's logit gradients sum to zero over the classes (``p - y``, also after a
per-example ``ClipGradient`` or a uniform rescaling), so no gradient ever moves the
kernel along the class-sum direction ``1 / sqrt(k)``: what it holds there is the
initialisation and the Gaussian noise, which is isotropic over the ``k`` class
columns. ``k ||W 1 / sqrt(k)||^2 / ||W||_F^2`` estimates the share of the
kernel's energy that is not signal (about 1: the kernel is noise).

Usage: ``python experiments/head_noise_share.py RUN_DIR [RUN_DIR ...]`` (run folders with ``model.keras``).
"""

import io
import os
import sys
import zipfile

import h5py
import numpy as np


def dense_kernels(model_path):
    with zipfile.ZipFile(model_path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
        found = []
        f.visititems(
            lambda name, item: found.append((name, item[()])) if name.endswith("vars/0") and item.ndim == 2 else None
        )
        return found


def main(run_dirs):
    for run_dir in run_dirs:
        for name, kernel in dense_kernels(os.path.join(run_dir, "model.keras")):
            kernel = kernel.astype(np.float64)
            share = np.sum(np.square(kernel.sum(axis=1))) / np.sum(np.square(kernel))
            singular = np.linalg.svd(kernel, compute_uv=False)
            print(
                f"{run_dir} {name}: noise share {share:.2f}; singular values {np.array2string(singular, precision=3)}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
