"""Randomized bound fuzzer: random architectures, weights, inputs and labels against true gradients.

Each case draws an architecture from every layer kind (dense and conv with
three constraints, biases, strides and padding; GroupSort-2/4, FullSort, ReLU,
Abs; max and l2-norm pooling with strides, global pooling; centering; residual
Add/Average; gradient clipping; every loss), weights (initial, trained by a few
SGD steps, or *lattice* weights), inputs and labels (random, at the norm bound,
lattice, gradient ascent; one-hot, worst-class, soft and arbitrary real
labels), and compares each variable's bound with the true per-sample gradient
norm of :func:`lipdp.verification.per_sample_gradient_norms` (one graph per
sample, no bound code), with no tolerance beyond the bounds' own rounding
margin.

Ties on purpose: lattice weights (entries in ``{-1, 0, 1} / 4``) and inputs
(multiples of ``1/8``, inside the clip ball) make float32 arithmetic exact, so
pre-activations that are equal in exact arithmetic are bitwise equal and
sorting activations and max pooling meet exact ties (the case that broke
GroupSort-2's backward pass). A test checks that the fuzzer catches that old
bug. The short fuzz runs in ``make test``; ``make test-slow`` runs a long one.
The counts are printed in pytest's summary.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import lipdp.layers as L
from lipdp import losses, verification
from lipdp.layers import activations

INPUT_NORM = 2.0
SUMMARY = {}  # printed by conftest.pytest_terminal_summary


@dataclasses.dataclass
class Tally:
    architectures: int = 0
    samples: int = 0
    max_ratio: float = 0.0

    def add(self, samples, ratio):
        self.samples += samples
        self.max_ratio = max(self.max_ratio, ratio)


def _activation(rng):
    kind = rng.choice(["groupsort2", "groupsort4", "fullsort", "relu", "abs"])
    return {
        "groupsort2": lambda: L.GroupSort(2),
        "groupsort4": lambda: L.GroupSort(4),
        "fullsort": L.FullSort,
        "relu": L.ReLU,
        "abs": L.Abs,
    }[kind]()


def _linear_options(rng):
    options = {"weight_constraint": str(rng.choice(["orthogonal", "spectral", "frobenius"]))}
    if rng.random() < 0.7:
        options["bias_bound"] = float(rng.uniform(0.1, 1.0))
    return options


def _conv_block(rng, h):
    filters = int(rng.choice([4, 8]))
    kernel = tuple(int(k) for k in rng.integers(1, 4, size=2))
    strides = tuple(int(s) for s in rng.integers(1, 3, size=2))
    if min(h.shape[1:3]) < max(kernel) + 2:
        strides = (1, 1)
    padding = str(rng.choice(["same", "valid"])) if min(h.shape[1:3]) > max(kernel) + 1 else "same"
    h = L.LipschitzConv2D(filters, kernel, strides=strides, padding=padding, **_linear_options(rng))(h)
    h = _activation(rng)(h)
    choice = rng.integers(0, 5)
    if choice == 0 and min(h.shape[1:3]) >= 3:
        h = L.MaxPooling2D(pool_size=int(rng.integers(2, 4)), strides=int(rng.integers(1, 3)), padding="same")(h)
    elif choice == 1 and min(h.shape[1:3]) >= 2:
        h = L.L2NormPooling2D(pool_size=2, strides=int(rng.integers(1, 3)), padding="same")(h)
    elif choice == 2:
        h = L.LayerCentering(axes=(1, 2) if rng.random() < 0.5 else None)(h)
    elif choice == 3:  # residual block on the same shape
        branch = L.LipschitzConv2D(int(h.shape[-1]), 3, padding="same", **_linear_options(rng))(h)
        branch = _activation(rng)(branch)
        merge = L.Add() if rng.random() < 0.5 else L.Average()
        h = merge([h, branch])
    return h


def random_architecture(rng):
    """A compiled functional model drawn from every layer kind, and its number of classes."""
    classes = int(rng.integers(2, 6))
    if rng.random() < 0.5:
        inp = tf.keras.Input((int(rng.integers(5, 10)), int(rng.integers(5, 10)), int(rng.integers(1, 3))))
        h = L.InputNormClip(INPUT_NORM)(inp)
        for _ in range(int(rng.integers(1, 3))):
            h = _conv_block(rng, h)
        h = L.GlobalL2NormPooling2D()(h) if rng.random() < 0.3 else L.Flatten()(h)
    else:
        inp = tf.keras.Input((int(rng.integers(3, 13)),))
        h = L.InputNormClip(INPUT_NORM)(inp)
    for _ in range(int(rng.integers(1, 4))):
        h = L.LipschitzDense(int(rng.choice([4, 8, 16])), **_linear_options(rng))(h)
        h = _activation(rng)(h)
        if rng.random() < 0.2:
            h = L.ClipGradient(float(rng.uniform(0.01, 0.5)))(h)
    out = L.LipschitzDense(classes, **_linear_options(rng))(h)
    loss = [
        losses.TauCategoricalCrossentropy(float(rng.choice([1.0, 8.0, 64.0]))),
        losses.MulticlassHinge(),
        losses.HingeKR(alpha=float(rng.uniform(1, 20))),
        losses.KCosineSimilarity(K=float(rng.uniform(0.5, 3))),
    ]
    model = tf.keras.Model(inp, out)
    model.compile(
        optimizer=tf.keras.optimizers.SGD(float(rng.choice([0.1, 1.0]))), loss=loss[int(rng.integers(0, len(loss)))]
    )
    return model, classes


def signed_partial_permutation(shape, rng):
    """A kernel whose matrix ``(-1, out)`` has at most one entry +-1 per row and column: norm 1, tight bounds."""
    rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
    matrix = np.zeros((rows, cols), "float32")
    for row, col in zip(rng.permutation(rows), rng.permutation(cols)):
        matrix[row, col] = rng.choice([-1.0, 1.0])
    return matrix.reshape(shape)


def lattice_weights(model, rng):
    """Kernels: signed partial permutations or entries in {-1, 0, 1} / 4; biases on the 1/4 lattice.

    Float32 arithmetic on lattice inputs is then exact, so ties are exact.
    """
    permutations = rng.random() < 0.5
    for variable in model.trainable_variables:
        if permutations and len(variable.shape) >= 2:
            variable.assign(signed_partial_permutation(tuple(variable.shape), rng))
        else:
            variable.assign(rng.integers(-1, 2, size=variable.shape).astype("float32") / 4)


def lattice_inputs(model, n, rng):
    """Entries in {-1, 0, 1} (many repeats), halved until inside the clip ball (the clip is the identity)."""
    shape = (n,) + tuple(model.input_shape[1:])
    x = rng.integers(-1, 2, size=shape).astype("float32")
    norms = np.linalg.norm(x.reshape(n, -1), axis=1)
    halvings = np.ceil(np.log2(np.maximum(norms / INPUT_NORM, 1.0)))
    return (x / (2.0**halvings).reshape((-1,) + (1,) * (x.ndim - 1))).astype("float32")  # exact: powers of 2


def random_inputs(model, n, rng):
    x = rng.normal(size=(n,) + tuple(model.input_shape[1:])) * rng.choice([0.1, 1.0, 100.0])
    return x.astype("float32")


def labels(model, x, classes, rng):
    """One-hot random, one-hot on the least likely class, soft, or arbitrary reals (losses project them)."""
    n = len(x)
    kind = rng.integers(0, 4)
    if kind == 0:
        index = rng.integers(0, classes, n)
    elif kind == 1:
        index = model.predict(x, verbose=0).argmin(axis=1)
    elif kind == 2:
        return rng.dirichlet(np.ones(classes), n).astype("float32")
    else:
        return (rng.normal(size=(n, classes)) * 3).astype("float32")
    return np.eye(classes, dtype="float32")[index]


def check_case(model, x, y, label):
    result = verification.verify_bounds(model, x, y, rtol=0.0)  # the bounds carry their own rounding margin
    assert not result.violations, f"{label}: {result.violations[:3]}"
    return result.max_ratio


def fuzz(seed, cases, samples, ascent_steps, tally):
    rng = np.random.default_rng(seed)
    for case in range(cases):
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(seed * 1000 + case)
        model, classes = random_architecture(rng)
        tally.architectures += 1
        label = f"seed {seed} case {case} ({[type(layer).__name__ for layer in model.layers]})"
        if rng.random() < 0.5:
            x, y = random_inputs(model, samples, rng), None
            y = labels(model, x, classes, rng)
            model.fit(x, y, batch_size=samples, epochs=int(rng.integers(1, 4)), verbose=0)  # trained weights
        lattice_weights_used = rng.random() < 0.4
        if lattice_weights_used:
            lattice_weights(model, rng)
        batches = {"random": random_inputs(model, samples, rng), "lattice": lattice_inputs(model, samples, rng)}
        for name, x in batches.items():
            y = labels(model, x, classes, rng)
            tally.add(samples, check_case(model, x, y, f"{label} {name} inputs"))
        if ascent_steps:
            x = batches["random"]
            y = labels(model, x, classes, rng)
            adversarial = verification.worst_case_inputs(model, x, y, steps=ascent_steps)
            tally.add(samples, check_case(model, adversarial, y, f"{label} gradient ascent"))


def test_short_fuzz_finds_no_violation():
    tally = SUMMARY.setdefault("short fuzz", Tally())
    for seed in (11, 12):
        fuzz(seed, cases=6, samples=6, ascent_steps=3, tally=tally)
    assert tally.architectures == 12 and tally.max_ratio > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 106))
def test_long_fuzz_finds_no_violation(seed):
    tally = SUMMARY.setdefault("long fuzz", Tally())
    fuzz(seed, cases=15, samples=12, ascent_steps=20, tally=tally)


def _min_max_pairs(first, second):
    """GroupSort-2 as it was: tf.minimum/tf.maximum send both cotangents to ``first`` at a tie."""
    return tf.concat([tf.minimum(first, second), tf.maximum(first, second)], axis=-1)


def test_fuzz_ties_catch_the_old_groupsort_bug(monkeypatch):
    """The tie construction has teeth: with the old GroupSort-2 the lattice cases find violations."""
    monkeypatch.setattr(activations, "_sort_pairs", _min_max_pairs)
    rng = np.random.default_rng(5)
    caught = 0
    for case in range(12):
        tf.keras.utils.set_random_seed(case)
        inp = tf.keras.Input((8,))
        h = L.InputNormClip(INPUT_NORM)(inp)
        h = L.GroupSort(2)(L.LipschitzDense(8)(h))
        model = tf.keras.Model(inp, L.LipschitzDense(3)(L.GroupSort(2)(L.LipschitzDense(8)(h))))
        model.compile(loss=losses.TauCategoricalCrossentropy(64.0))
        for variable in model.trainable_variables:
            variable.assign(signed_partial_permutation(tuple(variable.shape), rng))
        x = lattice_inputs(model, 64, rng)
        worst = np.eye(3, dtype="float32")[model.predict(x, verbose=0).argmin(axis=1)]
        result = verification.verify_bounds(model, x, worst, rtol=0.0)
        caught += bool(result.violations)
    assert caught >= 3, caught  # 5 of 12 when written; none with the fixed GroupSort


def test_gradient_ascent_stays_finite_on_a_flat_objective():
    """Logits exactly 0 (a dead network, seed 100 case 9): KCosineSimilarity's norm has no second derivative
    there, the ascent direction is 0 * inf = NaN; the sample takes no step instead of turning the inputs to NaN."""
    inp = tf.keras.Input((5,))
    h = L.GroupSort(2)(L.LipschitzDense(8)(L.InputNormClip(INPUT_NORM)(inp)))
    model = tf.keras.Model(inp, L.LipschitzDense(3)(h))
    model.compile(loss=losses.KCosineSimilarity(K=2.0))
    model.layers[-1].kernel.assign(tf.zeros_like(model.layers[-1].kernel))
    rng = np.random.default_rng(0)
    x, y = random_inputs(model, 4, rng), rng.normal(size=(4, 3)).astype("float32")
    adversarial = verification.worst_case_inputs(model, x, y, steps=3)
    assert np.isfinite(adversarial).all()
    np.testing.assert_array_equal(adversarial, x)
    check_case(model, adversarial, y, "flat objective")


def test_per_sample_gradients_survive_onednn_batch_of_one_conv():
    """A 1x1 convolution with strides (1, 2): TF 2.15's oneDNN Conv2DBackpropFilter corrupts the heap on a batch of
    one there (fuzz seed 102 case 6 aborted the process); per-sample gradients (batches of one) must survive it."""
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((6, 8, 2))
    h = L.LipschitzConv2D(4, 1, strides=(1, 2), padding="valid")(L.InputNormClip(INPUT_NORM)(inp))
    model = tf.keras.Model(inp, L.LipschitzDense(3)(L.Flatten()(L.GroupSort(2)(h))))
    model.compile(loss=losses.MulticlassHinge())
    rng = np.random.default_rng(0)
    x = random_inputs(model, 4, rng)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 4)]
    for _ in range(3):
        check_case(model, x, y, "1x1 strided conv")
    check_case(model, verification.worst_case_inputs(model, x, y, steps=2), y, "1x1 strided conv, ascent")
