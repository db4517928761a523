"""Noiseless ceilings of Lipschitz heads on cached CIFAR-10 scattering features (issue 20, carve only).

lipdp's clipless gradient is the plain gradient of the summed per-sample losses (each sample's logit
cotangent clipped by ``ClipGradient``) plus Gaussian noise; this script trains the same layers on the same
features with that gradient and *no noise* (not a DP run): exact per-channel standardisation (no release),
each example clipped to ``--input-clip``, shuffled batches, SGD with momentum, the layers' weight
constraints applied after each update (as in lipdp). It bounds what a head can reach before noise, to compare
with the linear head's noiseless 0.674 (``experiments/cifar_gap.py``, ``cifar10_gap.csv``). Fits the first
40,500 training images, scores the last 4,500 (``dataset.validation_fraction=0.1``). It also prints lipdp's
certified per-sample gradient bounds of the head (``lipdp.sensitivity.report``). One row per run is appended
to ``experiments/results/cifar10_heads_eps8.csv``.

    python experiments/cifar_heads_ceiling.py --head conv2x2 --filters 256 --dense-target 1 --epochs 30
"""

import argparse
import csv
import os
import sys
import time

import numpy as np

from lipdp import (
    keras,  # first of TensorFlow: the Keras 2 API lipdp runs on (lipdp.backend)
    losses,
    sensitivity,
)
from lipdp import layers as L
from lipdp.model import DPSequential

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar_gap  # noqa: E402  (cache file names, carve loading, exact statistics)

RESULTS = os.path.join(os.path.dirname(__file__), "results", "cifar10_heads_eps8.csv")
FIELDS = ["tool", "head", "settings", "split", "epsilon", "accuracy", "sensitivity", "wall_s", "command"]


def head_layers(args):
    """The layers after ``InputNormClip`` (the shapes of ``--head``)."""
    dense = L.LipschitzDense(10, weight_constraint="spectral", lipschitz_target=args.dense_target)
    tail = [L.Flatten(), dense, L.ClipGradient(args.logit_clip)]
    if args.head == "linear":
        return tail
    kernel = {"conv2x2": (2, 2), "conv1x1": (1, 1)}[args.head]
    conv = L.LipschitzConv2D(
        args.filters, kernel, strides=kernel, padding="valid", weight_constraint="orthogonal", lipschitz_target=1.0
    )
    middle = [conv]
    if args.hidden_clip:
        middle.append(L.ClipGradient(args.hidden_clip))
    return middle + [L.GroupSort()] + tail


def build(args):
    model = DPSequential([keras.Input((8, 8, 243)), L.InputNormClip(args.input_clip), *head_layers(args)])
    model.compile(
        optimizer=keras.optimizers.SGD(args.lr, momentum=args.momentum), loss=losses.TauCategoricalCrossentropy(1.0)
    )
    return model


def standardised(x, mean, scale, bound):
    """In place: ``(x - mean) / scale`` per channel, then each example projected onto the ``bound`` ball."""
    for start in range(0, len(x), 4096):
        block = x[start : start + 4096]
        block -= mean.astype(np.float32)
        block /= scale.astype(np.float32)
    cifar_gap.clip_rows(x.reshape(len(x), -1), bound)
    return x


def make_step(model):
    import tensorflow as tf

    variables = model.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, variables)
        size = tf.cast(tf.shape(x)[0], tf.float32)
        model.optimizer.apply_gradients([(g / size, v) for g, v in zip(grads, variables)])

    return step


def accuracy(model, x, y):
    predictions = np.concatenate([np.argmax(model(x[i : i + 1024]).numpy(), 1) for i in range(0, len(x), 1024)])
    return float(np.mean(predictions == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", choices=["linear", "conv2x2", "conv1x1"], required=True)
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--dense-target", type=float, default=1.0)
    parser.add_argument("--hidden-clip", type=float, default=None, help="ClipGradient after the convolution")
    cifar_gap.add_clip_and_optimiser_arguments(parser)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--data-dir", default="/work/shared/data/cifar10")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    import tensorflow as tf

    start = time.time()
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train, x_test, y_test = cifar_gap.load("raw", "carve", args.data_dir)
    mean, scale = cifar_gap.exact_statistics(x_train)
    for x in (x_train, x_test):
        standardised(x, mean, scale, args.input_clip)
    model = build(args)
    report = sensitivity.report(model)
    print(report, flush=True)
    total = float(report.rsplit(":", 1)[1])
    step = make_step(model)
    curve = []
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        for first in range(0, len(order) - args.batch + 1, args.batch):
            index = np.sort(order[first : first + args.batch])
            step(tf.constant(x_train[index]), tf.constant(y_train[index].astype(np.int32)))
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            curve.append(accuracy(model, x_test, y_test))
            print(f"epoch {epoch}: carve accuracy {curve[-1]:.4f} ({time.time() - start:.0f} s)", flush=True)
    settings = (
        f"noiseless (no release, no noise; exact statistics), {args.head}"
        + (f" {args.filters} filters orthogonal + GroupSort" if args.head != "linear" else "")
        + f", Dense target {args.dense_target}, hidden clip {args.hidden_clip}, input clip {args.input_clip}, "
        f"logit clip {args.logit_clip}, SGD lr {args.lr} m {args.momentum}, shuffled {args.batch}, {args.epochs} ep; "
        f"curve every {args.eval_every} ep: " + " ".join(f"{a:.3f}" for a in curve)
    )
    write_row(
        dict(
            tool="ceiling script",
            head=args.head,
            settings=(args.label + ": " if args.label else "") + settings,
            split="carve",
            epsilon="inf (no noise)",
            accuracy=f"{curve[-1]:.4f}",
            sensitivity=f"{total:.4g}",
            wall_s=f"{time.time() - start:.0f}",
            command="python experiments/cifar_heads_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
    )


def write_row(row):
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
