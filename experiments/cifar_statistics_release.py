"""How well each private release recovers the per-channel scale of CIFAR-10 scattering features (issue 20).

Compares, on the carve's training part (first 40,500 images, raw J=2 L=8 features of [0, 1]
images), the exact per-channel standard deviations with those released by lipdp
(``release_channel_statistics``, noise multiplier 8, several per-moment clips) and by
Handcrafted-DP's procedure (``cifar_gap.tramer_statistics``). No training.
"""

import os
import sys

import numpy as np

from lipdp import statistics

sys.path.insert(0, os.path.dirname(__file__))
import cifar_gap  # noqa: E402


def describe(name, mean, scale, exact_mean, exact_scale):
    ratio = scale / exact_scale
    off = int(np.sum((ratio > 2) | (ratio < 0.5)))
    quantiles = " ".join(f"{q:.3g}" for q in np.quantile(ratio, [0, 0.1, 0.5, 0.9, 1]))
    error = np.median(np.abs(mean - exact_mean) / exact_scale)
    print(
        f"{name}: released/exact scale quantiles (0 .1 .5 .9 1) {quantiles}; channels off by > 2x: {off}/243; "
        f"median |mean error| / std {error:.3f}"
    )


def main():
    path = os.path.join(cifar_gap.CACHE, cifar_gap.FEATURES["raw"][0])
    x = np.array(np.load(path, mmap_mode="r")[: cifar_gap.CARVE])
    norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
    print(
        f"example norms: median {np.median(norms):.2f}, 99th percentile {np.quantile(norms, 0.99):.2f}, "
        f"max {norms.max():.2f}"
    )
    exact_mean, exact_scale = cifar_gap.exact_statistics(x)
    print("exact std quantiles:", " ".join(f"{q:.3g}" for q in np.quantile(exact_scale, [0, 0.1, 0.5, 0.9, 1])))
    describe(
        "Handcrafted-DP (median clips, z=8 twice)",
        *cifar_gap.tramer_statistics(x, 8.0, np.random.default_rng()),
        exact_mean,
        exact_scale,
    )
    clip = 55.5  # no example is projected (largest norm 13.7): only the per-moment clips act
    means, mean_squares = statistics.example_moments(x, clip)
    print("norms of the examples' channel-mean vectors (quantiles .05 .5 .95):", quantiles(means))
    deviations = statistics.squared_deviations(means, mean_squares, exact_mean)
    print("norms of their squared-deviation vectors (quantiles .05 .5 .95):", quantiles(deviations))
    for mean_clip, variance_clip in ((None, None), (0.8, 0.4), (0.8, 0.2), (0.8, 0.1), (0.4, 0.1), (0.8, 0.05)):
        layer = statistics.release_channel_statistics(
            x, clip_norm=clip, noise_multiplier=8.0, scale=True, mean_clip=mean_clip, variance_clip=variance_clip
        )
        name = f"lipdp R {clip}, mean_clip {mean_clip}, variance_clip {variance_clip}"
        describe(name, np.array(layer.mean), np.array(layer.scale), exact_mean, exact_scale)


def quantiles(rows):
    return " ".join(f"{q:.3g}" for q in np.quantile(np.linalg.norm(rows, axis=1), [0.05, 0.5, 0.95]))


if __name__ == "__main__":
    main()
