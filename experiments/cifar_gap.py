"""A fast stand-alone DP-SGD simulator for a linear head on cached CIFAR-10 scattering features (issue 20).

Not lipdp's training loop: a numpy re-implementation of the one thing a linear
softmax head needs (per-example gradients are ``x (p - y)^T``, so their norms are
``||x|| ||p - y||``), fast enough to isolate one factor at a time (features,
normalisation, head constraint, loss, mechanism, sampling) before confirming the
findings with ``lipdp train``. The noise multiplier comes from lipdp's accountant
(``lipdp.accounting.calibrate_noise_multiplier``, RDP, Poisson subsampling, with
the statistics releases composed), and lipdp's own statistics release
(``lipdp.statistics.release_channel_statistics``) is used for ``--norm lipdp``.

Features are read from lipdp's feature cache (``cached_features`` of
``configs/cifar10*.yaml``'s front-ends). ``--split carve`` fits on the first
40,500 training images and scores the last 4,500 (``dataset.validation_fraction=0.1``);
``--split validation`` fits on all 45,000 and scores the 5,000-image validation split.
Every run appends one row to ``experiments/results/cifar10_gap.csv``.
"""

import argparse
import csv
import math
import os
import sys
import time

import numpy as np

from lipdp import accounting, statistics  # lipdp before tensorflow

CACHE = os.path.expanduser("~/.cache/lipdp/features")
FEATURES = {  # (training, validation) cache files
    "raw": ("Scattering2D-2b0763402f21c4c233aacbc78b7200a9.npy", "Scattering2D-eaec3277429aea9efd53c80e0f997dcb.npy"),
    "group": ("Scattering2D-05060c78a192d705e8048d11e10bfa4c.npy", "Scattering2D-b099650a38016ad7ce22f4aecc26fc60.npy"),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results", "cifar10_gap.csv")
CARVE = 40500
FLIPPED = "flipped-{}-{}.npy"  # features of the horizontally flipped images, in CACHE (this script's own)


def flipped_features(features, data_dir):
    """(training, validation) scattering features of the mirrored images, computed once (about 3 minutes)."""
    from lipdp.layers.frontends import Scattering2D

    if features != "raw":
        raise SystemExit("--flip needs --features raw")
    images = np.load(os.path.join(data_dir, "cifar10.npz"))
    files = [os.path.join(CACHE, FLIPPED.format(features, split)) for split in ("train", "test")]
    if not all(os.path.exists(f) for f in files):
        scattering = Scattering2D(J=2, L=8)
        for name, f in zip(("x_train", "x_test"), files):
            x = images[name]
            parts = [
                scattering(x[i : i + 2000, :, ::-1].astype(np.float32) / 255.0).numpy() for i in range(0, len(x), 2000)
            ]
            np.save(f, np.concatenate(parts))
    return [np.load(f, mmap_mode="r") for f in files]


def load(features, split, data_dir):
    labels = np.load(os.path.join(data_dir, "cifar10.npz"))
    train_file, validation_file = (os.path.join(CACHE, name) for name in FEATURES[features])
    train = np.load(train_file, mmap_mode="r")
    if split == "carve":
        return (
            np.array(train[:CARVE]),
            labels["y_train"][:CARVE].ravel(),
            np.array(train[CARVE:]),
            labels["y_train"][CARVE:].ravel(),
        )
    return np.array(train), labels["y_train"].ravel(), np.load(validation_file), labels["y_test"].ravel()


def tramer_statistics(x, noise_multiplier, rng):
    """Per-channel mean and variance as Handcrafted-DP releases them: each example's vector of channel means
    (and of channel mean squares) clipped to the median norm of those vectors, summed, noise multiplier z each."""
    means, squares = statistics.example_moments(x, None)

    def noisy_mean(v):
        norms = np.linalg.norm(v, axis=1)
        threshold = np.quantile(norms, 0.5)
        v = v / np.maximum(norms / threshold, 1.0)[:, None]
        return v.mean(axis=0) + rng.normal(0.0, threshold * noise_multiplier, v.shape[1]) / len(v)

    mean = noisy_mean(means)
    variance = np.maximum(noisy_mean(squares) - mean**2, 0.0)
    return mean, np.sqrt(variance + 1e-5)  # torch BatchNorm2d's eps


def exact_statistics(x):
    means, squares = statistics.example_moments(x, None)
    mean = means.mean(axis=0)
    return mean, np.sqrt(np.maximum(squares.mean(axis=0) - mean**2, 0.0) + 1e-5)


def flipped_splits(args):
    """The mirror images' features of ``args.split``'s (training, scored) images, memory-mapped."""
    train_flipped, test_flipped = flipped_features(args.features, args.data_dir)
    if args.split == "carve":
        return train_flipped[:CARVE], train_flipped[CARVE:]
    return train_flipped, test_flipped


def mirrored(x):
    """Scattering features (J 2, L 8, 3 colours) of an approximate mirror image: the 8x8 map mirrored and each
    orientation l mapped to (6 - l) mod 8 (kymatio's angles (3 - l) pi / 8 reflect to their negatives)."""
    orientation = [(6 - angle) % 8 for angle in range(8)]
    order_1 = [1 + 8 * j + orientation[angle] for j in range(2) for angle in range(8)]
    order_2 = [17 + 8 * orientation[l1] + orientation[l2] for l1 in range(8) for l2 in range(8)]
    per_colour = np.array([0, *order_1, *order_2])
    channels = np.concatenate([81 * colour + per_colour for colour in range(3)])
    return np.ascontiguousarray(x[:, :, ::-1, :][..., channels])


def average_views(x, x_flipped):
    """``x`` replaced, in place, by the mean of its features and those of the mirror images."""
    for first in range(0, len(x), 4096):
        x[first : first + 4096] += x_flipped[first : first + 4096]
        x[first : first + 4096] *= 0.5


def normalise(args, x_train, x_test, rng, extra=()):
    """(standardised train, test, releases for the accountant), in place."""
    releases = ()
    if args.norm == "none":
        return x_train, x_test, releases
    if args.norm == "exact":
        mean, scale = exact_statistics(x_train)
    elif args.norm == "tramer":
        mean, scale = tramer_statistics(x_train, args.bn_noise, rng)
        releases = (args.bn_noise, args.bn_noise)
    else:  # lipdp's release: the layer projects each example onto the stat_clip ball first
        layer = statistics.release_channel_statistics(
            x_train,
            clip_norm=args.stat_clip,
            noise_multiplier=args.bn_noise,
            scale=bool(args.scale),
            mean_clip=args.mean_clip,
            variance_clip=args.variance_clip,
        )
        mean, scale = np.array(layer.mean), np.array(layer.scale)
        releases = (args.bn_noise,)
        for x in (x_train, x_test, *extra):
            clip_rows(x.reshape(len(x), -1), args.stat_clip)
    if args.norm != "lipdp" and not args.scale:
        scale = np.ones_like(scale)
    for x in (x_train, x_test, *extra):
        for start in range(0, len(x), 4096):
            x[start : start + 4096] -= mean.astype(np.float32)
            x[start : start + 4096] /= scale.astype(np.float32)
    return x_train, x_test, releases


def clip_rows(x, bound):
    """Each row of ``x`` projected onto the ``bound`` ball, in place (the carve's features fill most of memory)."""
    for start in range(0, len(x), 4096):
        x[start : start + 4096] = statistics.project_rows(x[start : start + 4096], bound)


def batches(args, n, rng):
    if args.sampling == "poisson":
        for _ in range(max(1, round(n / args.batch))):
            yield np.flatnonzero(rng.random(n) < args.batch / n)
    else:
        order = rng.permutation(n)
        for start in range(0, n - args.batch + 1, args.batch):
            yield np.sort(order[start : start + args.batch])


def steps_per_epoch(args, n):
    return max(1, round(n / args.batch)) if args.sampling == "poisson" else n // args.batch


def logit_gradients(args, logits, labels):
    z = args.tau * logits
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p


def clipped_logit_gradients(args, x, w, b, labels, row_norms):
    """Per-example logit gradients of one view, clipped as the mechanism does, and the mechanism's bound."""
    g = logit_gradients(args, x @ w + b, labels)
    g_norms = np.linalg.norm(g, axis=1)
    if args.mechanism == "flat":  # per-example gradient norm ||g|| sqrt(||x||^2 + 1) clipped to C
        g *= np.minimum(1.0, args.clip / np.maximum(g_norms * np.sqrt(row_norms**2 + 1), 1e-12))[:, None]
        return g, args.clip
    if args.mechanism == "clipless":  # inputs already clipped to R; logit gradients to c
        g *= np.minimum(1.0, args.logit_clip / np.maximum(g_norms, 1e-12))[:, None]
        return g, args.logit_clip * math.sqrt(args.input_clip**2 + 1)
    return g, 0.0


def train(args, x_train, y_train, noise_multiplier, rng, x_views=()):
    """SGD on ``x_train``; with ``x_views`` (other views of the same examples) each example's gradient is the mean
    of its views' clipped gradients (augmentation multiplicity), whose bound is one view's."""
    n, d = x_train.shape
    w, b = np.zeros((d, 10), np.float32), np.zeros(10, np.float32)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    total, step = args.epochs * steps_per_epoch(args, n), 0
    averages = {momentum: (w.copy(), b.copy()) for momentum in args.ema}
    views = (x_train, *x_views)
    row_norms = [np.linalg.norm(view, axis=1) for view in views]
    for _ in range(args.epochs):
        for index in batches(args, n, rng):
            labels = y_train[index]
            gw, gb = np.zeros_like(w), np.zeros_like(b)
            for view, norms in zip(views, row_norms):
                x = view[index]
                g, bound = clipped_logit_gradients(args, x, w, b, labels, norms[index])
                gw += x.T @ g / len(views)
                gb += g.sum(axis=0) / len(views)
            if noise_multiplier:
                gw += rng.normal(0.0, noise_multiplier * bound, gw.shape).astype(np.float32)
                gb += rng.normal(0.0, noise_multiplier * bound, gb.shape).astype(np.float32)
            lr = args.lr * (0.5 * (1 + math.cos(math.pi * step / total)) if args.decay == "cosine" else 1.0)
            vw, vb = args.momentum * vw + gw / args.batch, args.momentum * vb + gb / args.batch
            w -= lr * vw
            b -= lr * vb
            if args.spectral:  # lipdp's SpectralNormConstraint: projection onto ||W||_2 <= 1 after each update
                w *= min(1.0, 1.0 / math.sqrt(np.linalg.eigvalsh(w.T.astype(np.float64) @ w)[-1]))
            for momentum, (average_w, average_b) in averages.items():  # Keras' use_ema, after each step
                average_w += (1.0 - momentum) * (w - average_w)
                average_b += (1.0 - momentum) * (b - average_b)
            step += 1
    return {None: (w, b), **averages}


def add_clip_and_optimiser_arguments(parser):
    """The clipless clips and the SGD settings (``configs/cifar10.yaml``'s values) that the head experiments share."""
    parser.add_argument("--input-clip", type=float, default=50.0)
    parser.add_argument("--logit-clip", type=float, default=0.002)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=FEATURES, default="raw")
    parser.add_argument("--split", choices=("carve", "validation"), default="carve")
    parser.add_argument("--norm", choices=("none", "exact", "tramer", "lipdp"), default="tramer")
    parser.add_argument("--scale", type=int, default=1, help="divide by the (released) standard deviation")
    parser.add_argument("--bn-noise", type=float, default=8.0)
    parser.add_argument("--stat-clip", type=float, default=55.5)
    parser.add_argument("--mean-clip", type=float, default=None, help="lipdp's per-moment clip of the means")
    parser.add_argument("--variance-clip", type=float, default=None, help="and of the squared deviations")
    parser.add_argument("--mechanism", choices=("flat", "clipless", "none"), default="flat")
    parser.add_argument("--clip", type=float, default=0.1)
    add_clip_and_optimiser_arguments(parser)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--spectral", type=int, default=0)
    parser.add_argument("--decay", choices=("none", "cosine"), default="none")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--sampling", choices=("poisson", "shuffle"), default="shuffle")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--ema", type=float, nargs="*", default=[], help="also score averaged weights (momenta)")
    parser.add_argument(
        "--flip",
        choices=("none", "exact", "mirror", "average"),
        default="none",
        help="train on two views: the image's features and those of its mirror image (exact: computed from the "
        "flipped image; mirror: the feature map mirrored, the orientations permuted); average: one view, the mean "
        "of the image's and its mirror image's features (a flip-invariant front-end)",
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
    args = parser.parse_args(argv)
    start = time.time()
    rng = np.random.default_rng()
    x_train, y_train, x_test, y_test = load(args.features, args.split, args.data_dir)
    flipped = ()
    if args.flip == "exact":
        flipped = tuple(np.array(x) for x in flipped_splits(args))
    elif args.flip == "mirror":
        flipped = (mirrored(x_train), mirrored(x_test))
    elif args.flip == "average":
        for x, x_flipped in zip((x_train, x_test), flipped_splits(args)):
            average_views(x, x_flipped)
    x_train, x_test, releases = normalise(args, x_train, x_test, rng, flipped)
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    flipped = tuple(x.reshape(len(x), -1) for x in flipped)
    if args.mechanism == "clipless":
        for x in (x_train, x_test, *flipped):
            clip_rows(x, args.input_clip)
    noise = 0.0
    if args.mechanism != "none" and args.epsilon > 0:  # --epsilon 0: clipped but noiseless
        noise = accounting.calibrate_noise_multiplier(
            target_epsilon=args.epsilon,
            delta=1e-5,
            sampling_rate=args.batch / len(x_train),
            steps=args.epochs * steps_per_epoch(args, len(x_train)),
            releases=releases,
        )
    heads = train(args, x_train, y_train, noise, rng, flipped[:1])
    seconds = time.time() - start
    epsilon = args.epsilon if noise else "inf"
    command = "python experiments/cifar_gap.py " + " ".join(sys.argv[1:] if argv is None else argv)
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["tool", "label", "split", "epsilon", "noise_multiplier", "accuracy", "wall_s", "command"])
        for momentum, (w, b) in heads.items():
            logits = x_test @ w + b
            accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
            # the loss's logit gradients sum to 0 over the classes: W's class-sum direction holds noise only
            noise_share = float(np.sum(np.square(w.sum(axis=1)))) / max(float(np.sum(np.square(w))), 1e-30)
            label = args.label if momentum is None else f"{args.label} [weights averaged, EMA {momentum}]"
            if flipped:  # test-time augmentation: logits averaged over the image and its mirror
                tta = float(np.mean(np.argmax(logits + flipped[1] @ w + b, axis=1) == y_test))
                print(f"{label}: with test-time flip averaging {tta:.4f}")
                row = [f"{label} [test-time flip]", args.split, epsilon, f"{noise:.4f}", f"{tta:.4f}", f"{seconds:.0f}"]
                writer.writerow(["simulator", *row, command])
            print(f"{label}: accuracy {accuracy:.4f} (noise {noise:.3f}, W's noise share {noise_share:.2f})")
            row = [label, args.split, epsilon, f"{noise:.4f}", f"{accuracy:.4f}", f"{seconds:.0f}", command]
            writer.writerow(["simulator", *row])


if __name__ == "__main__":
    main()
