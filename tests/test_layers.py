"""Layer-level checks of the bound protocol against independent computations.

Each layer states ``output_bound``, ``lipschitz_constant`` /
``input_cotangent_bound`` and ``gradient_bounds``. Here every one of them is
compared, layer by layer, with quantities computed without the bound code:

* the exact operator norm of a linear layer, from the explicit matrix built by
  applying the layer to the identity basis (numpy SVD), and its top singular
  vectors as worst-case inputs / cotangents;
* per-sample kernel and bias gradients from ``tf.GradientTape`` with
  ``output_gradients``, checked against a patch-extraction reference, and on
  inputs found by alternating ascent of the gradient norm;
* explicit Jacobians (``tape.batch_jacobian``) of activations and pooling;
* numpy references of sorting and of window pooling with explicit padding.

Tightness (measured / bound) is logged with ``log.warning("tightness ...")``;
it is asserted only where the bound is known to be attained (bias terms,
rank-one dense gradients, pooling of a single pixel). Whole-model checks live
in ``test_sensitivity.py``.
"""

import json
import logging
import math

import numpy as np
import pytest
import tensorflow as tf

import lipdp.layers as L
from lipdp import losses, verification

log = logging.getLogger(__name__)

RTOL = 1e-5  # float32 forward pass vs float64 bounds
B64 = tf.float64


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)


def f64(value):
    return tf.constant(value, B64)


def norms(batch):
    """Per-sample l2 norms (float64) of a batch array/tensor."""
    a = np.asarray(batch, np.float64)
    return np.linalg.norm(a.reshape(len(a), -1), axis=1)


def unit(batch):
    a = np.asarray(batch, np.float64)
    n = norms(a).reshape((-1,) + (1,) * (a.ndim - 1))
    return a / np.maximum(n, 1e-300)


def tightness(label, ratio):
    log.warning("tightness %-60s ratio=%.6f", label, ratio)


def explicit_matrix(layer, in_shape):
    """Matrix ``M`` (inputs x outputs) with ``layer(x) - layer(0) = x_flat @ M``."""
    n = math.prod(in_shape)
    basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(in_shape))
    zero = layer(np.zeros((1,) + tuple(in_shape), np.float32))
    return (layer(basis) - zero).numpy().reshape(n, -1).astype(np.float64)


def worst_output_inputs(matrix, offset, radius, iters=30):
    """Maximises ``||x M + offset||`` over ``||x|| = radius`` (power-like ascent)."""
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    starts = [u[:, 0], -u[:, 0]]
    found = []
    for x in starts:
        x = radius * x
        for _ in range(iters):
            g = matrix @ (x @ matrix + offset)
            x = radius * g / max(np.linalg.norm(g), 1e-300)
        found.append(x)
    return np.stack(found)


def nonzero_bias(layer, scale=10.0):
    """Pushes the bias to its norm ball's boundary (non-zero, random direction)."""
    layer.bias.assign(layer.bias_constraint(tf.random.normal(layer.bias.shape) * scale))
    assert np.linalg.norm(layer.bias.numpy()) == pytest.approx(layer.bias_bound, rel=1e-5)


def kernel_gradient(layer, x, z):
    """Per-sample kernel and bias gradients for cotangent ``z`` (one sample at a time)."""
    grads = []
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1], tf.float32)
        with tf.GradientTape() as tape:
            out = layer(xi)
        grads.append(
            tape.gradient(out, layer.trainable_variables, output_gradients=tf.constant(z[i : i + 1], tf.float32))
        )
    return grads


def assert_bias_gradient_bound_attained(layer, x, z, label):
    """A cotangent constant over positions makes ||grad b|| = sqrt(P) ||z||: the bound must hold and be attained."""
    ((_, g_bias),) = kernel_gradient(layer, x, z)
    _, (_, bias_bound) = layer.gradient_bounds(f64(norms(x)[0]), f64(norms(z)[0]))
    measured = np.linalg.norm(g_bias.numpy())
    assert measured <= float(bias_bound) * (1 + RTOL)
    assert measured == pytest.approx(float(bias_bound), rel=1e-4)
    tightness(label, measured / float(bias_bound))


# ---------------------------------------------------------------------------------------------
# LipschitzConv2D
# ---------------------------------------------------------------------------------------------

# (kernel_size, strides, padding, input shape (H, W, C), filters, weight_constraint)
CONV_CASES = [
    (1, 1, "same", (5, 5, 3), 4, "orthogonal"),
    (3, 1, "same", (6, 6, 2), 3, "spectral"),
    (3, 2, "same", (7, 7, 2), 3, "frobenius"),
    (3, 2, "valid", (8, 8, 2), 2, "orthogonal"),
    (5, 1, "valid", (8, 8, 1), 2, "spectral"),
    (5, 3, "same", (10, 10, 1), 3, "orthogonal"),
    ((3, 2), (2, 1), "same", (7, 6, 2), 3, "spectral"),
    ((1, 5), (3, 2), "valid", (8, 9, 2), 2, "frobenius"),
    (2, 2, "valid", (6, 6, 3), 4, "orthogonal"),
    (4, (1, 3), "same", (7, 8, 1), 2, "orthogonal"),
    (3, 3, "same", (9, 9, 2), 2, "frobenius"),
    (1, 2, "valid", (5, 5, 3), 2, "spectral"),
]
CONV_IDS = [f"k{c[0]}-s{c[1]}-{c[2]}-{'x'.join(map(str, c[3]))}-{c[5]}".replace(" ", "") for c in CONV_CASES]


def make_conv(case, bias_bound=0.7, target=1.0):
    kernel, strides, padding, in_shape, filters, constraint = case
    layer = L.LipschitzConv2D(
        filters,
        kernel,
        strides=strides,
        padding=padding,
        weight_constraint=constraint,
        lipschitz_target=target,
        bias_bound=bias_bound,
    )
    layer(np.zeros((1,) + in_shape, np.float32))
    if bias_bound:
        nonzero_bias(layer)
    return layer, in_shape


def expected_overlap(kernel, strides):
    """Brute force: the most windows any input index lies in, per axis, multiplied."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    strides = (strides, strides) if isinstance(strides, int) else strides
    total = 1
    for k, s in zip(kernel, strides):
        total *= max(sum(1 for o in range(0, 64) if o * s <= i < o * s + k) for i in range(64))
    return total


def conv_patches(layer, x):
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    return tf.image.extract_patches(
        tf.constant(x, tf.float32), [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], layer.padding.upper()
    )


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_overlap_and_forward_match_a_patch_reference(case):
    layer, in_shape = make_conv(case)
    assert layer.overlap == expected_overlap(case[0], case[1])
    x = np.random.default_rng(0).normal(size=(2,) + in_shape).astype("float32")
    patches = conv_patches(layer, x).numpy().astype(np.float64)
    kernel = layer.kernel.numpy().reshape(-1, layer.filters).astype(np.float64)
    reference = patches @ kernel + layer.bias.numpy()
    np.testing.assert_allclose(layer(x).numpy(), reference, atol=1e-5)
    assert layer.positions == reference.shape[1] * reference.shape[2]


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_operator_norm_and_output_bound(case):
    layer, in_shape = make_conv(case)
    for scale in (1.0, 3.0):  # 3.0: the lip-dp trap, a kernel 3x over its constraint
        if scale != 1.0:
            before = float(layer.lipschitz_constant())
            layer.kernel.assign(layer.kernel * scale)
            assert float(layer.lipschitz_constant()) == pytest.approx(scale * before, rel=1e-5)
        matrix = explicit_matrix(layer, in_shape)
        exact = np.linalg.norm(matrix, 2)
        lip = float(layer.lipschitz_constant())
        assert exact <= lip * (1 + RTOL), f"true operator norm {exact} > certified {lip}"
        assert float(layer.input_cotangent_bound(f64(2.0))) == pytest.approx(2 * lip)
        tightness(f"conv {case} x{scale} operator norm / lipschitz_constant", exact / lip)

        # output bound on random, structured and worst-case inputs of norm b
        radius = 2.0
        rng = np.random.default_rng(1)
        h, w, c = in_shape
        checker = np.indices((h, w)).sum(0) % 2 * 2.0 - 1.0
        candidates = np.concatenate(
            [
                rng.normal(size=(4,) + in_shape),
                np.ones((1,) + in_shape),
                np.repeat(checker[None, :, :, None], c, axis=3),
            ]
        ).reshape(6, -1)
        offset = layer(np.zeros((1,) + in_shape, np.float32)).numpy().reshape(-1).astype(np.float64)
        candidates = np.concatenate([radius * unit(candidates), worst_output_inputs(matrix, offset, radius)])
        out = layer(candidates.reshape((-1,) + in_shape).astype("float32"))
        bound = float(layer.output_bound(f64(radius)))
        measured = norms(out)
        assert np.all(measured <= bound * (1 + RTOL)), (measured, bound)
        tightness(f"conv {case} x{scale} output / output_bound", measured.max() / bound)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_input_cotangent_bound_on_worst_cotangent(case):
    layer, in_shape = make_conv(case)
    matrix = explicit_matrix(layer, in_shape)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    out_shape = tuple(layer.compute_output_shape((1,) + in_shape)[1:])
    z = np.concatenate([vt[:1], np.random.default_rng(2).normal(size=(3, vt.shape[1]))])
    z = unit(z).reshape((-1,) + out_shape).astype("float32")
    x = tf.Variable(np.random.default_rng(3).normal(size=(4,) + in_shape).astype("float32"))
    with tf.GradientTape() as tape:
        out = layer(x)
    grad = tape.gradient(out, x, output_gradients=tf.constant(z))
    bound = float(layer.input_cotangent_bound(f64(1.0)))
    measured = norms(grad)
    assert np.all(measured <= bound * (1 + RTOL))
    tightness(f"conv {case} input cotangent / bound", measured.max() / bound)


def _kernel_gradient_ascent(layer, x, z, steps=8):
    """Alternating power ascent of ||sum_p patch_p(x) z_p^T||_F over unit x and z (patch reference)."""
    x = tf.constant(unit(x), tf.float32)
    z = tf.constant(unit(z), tf.float32)

    def objective(x, z):
        g = tf.einsum("bhwk,bhwo->bko", conv_patches(layer, x), z)
        return tf.reduce_sum(tf.square(g))

    for _ in range(steps):
        for which in ("x", "z"):
            with tf.GradientTape() as tape:
                tape.watch([x, z])
                value = objective(x, z)
            gx, gz = tape.gradient(value, [x, z])
            if which == "x":
                x = tf.constant(unit(gx.numpy() + 1e-30), tf.float32)
            else:
                z = tf.constant(unit(gz.numpy() + 1e-30), tf.float32)
    return x.numpy(), z.numpy()


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_kernel_and_bias_gradient_bounds(case):
    layer, in_shape = make_conv(case)
    out_shape = tuple(layer.compute_output_shape((1,) + in_shape)[1:])
    rng = np.random.default_rng(4)
    h, w, c = in_shape
    ho, wo, co = out_shape
    checker_in = np.repeat((np.indices((h, w)).sum(0) % 2 * 2.0 - 1.0)[None, :, :, None], c, axis=3)
    checker_out = np.repeat((np.indices((ho, wo)).sum(0) % 2 * 2.0 - 1.0)[None, :, :, None], co, axis=3)
    xs = [rng.normal(size=(3,) + in_shape) * 5, np.ones((1,) + in_shape), checker_in, np.ones((1,) + in_shape)]
    zs = [rng.normal(size=(3,) + out_shape) * 0.1, np.ones((1,) + out_shape), checker_out, checker_out]
    ax, az = _kernel_gradient_ascent(layer, rng.normal(size=(3,) + in_shape), rng.normal(size=(3,) + out_shape))
    x = np.concatenate(xs + [ax]).astype("float32")
    z = np.concatenate(zs + [az]).astype("float32")

    grads = kernel_gradient(layer, x, z)
    patch_reference = tf.einsum("bhwk,bhwo->bko", conv_patches(layer, x), z).numpy()
    worst_kernel = 0.0
    for i, (g_kernel, g_bias) in enumerate(grads):
        np.testing.assert_allclose(
            g_kernel.numpy().reshape(patch_reference[i].shape), patch_reference[i], atol=1e-4, rtol=1e-4
        )
        (kv, kernel_bound), (bv, bias_bound) = layer.gradient_bounds(
            f64(norms(x[i : i + 1])[0]), f64(norms(z[i : i + 1])[0])
        )
        assert kv is layer.kernel and bv is layer.bias
        kernel_norm = np.linalg.norm(g_kernel.numpy())
        expected_bound = math.sqrt(layer.overlap) * norms(x[i : i + 1])[0] * norms(z[i : i + 1])[0]
        assert float(kernel_bound) == pytest.approx(expected_bound, rel=1e-6)
        assert kernel_norm <= float(kernel_bound) * (1 + RTOL), (i, kernel_norm, float(kernel_bound))
        assert np.linalg.norm(g_bias.numpy()) <= float(bias_bound) * (1 + RTOL)
        worst_kernel = max(worst_kernel, kernel_norm / float(kernel_bound))
    tightness(f"conv {case} kernel gradient / bound", worst_kernel)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_bias_trap_sqrt_positions_is_attained(case):
    """x = 0 gives ||out|| = sqrt(P)||b||; a spatially constant z gives ||grad b|| = sqrt(P)||z||."""
    layer, in_shape = make_conv(case)
    out_shape = tuple(layer.compute_output_shape((1,) + in_shape)[1:])
    positions = out_shape[0] * out_shape[1]
    assert layer.positions == positions
    bias_norm = np.linalg.norm(layer.bias.numpy().astype(np.float64))

    out = layer(np.zeros((1,) + in_shape, np.float32))
    bound = float(layer.output_bound(f64(0.0)))
    assert norms(out)[0] <= bound * (1 + RTOL)
    assert norms(out)[0] == pytest.approx(bound, rel=1e-4)
    assert bound == pytest.approx(math.sqrt(positions) * bias_norm, rel=1e-6)

    z = np.broadcast_to(np.random.default_rng(5).normal(size=out_shape[-1]), (1,) + out_shape)
    x = np.random.default_rng(6).normal(size=(1,) + in_shape)
    assert_bias_gradient_bound_attained(layer, x, z, f"conv {case} bias trap (x=0 output, constant z)")


def _deel_lip_border_averaged_factor(kernel_size, input_hw):
    """deel-lip's stride-1 coefficient: sqrt(h w / ((kh h - a(a+1)) (kw w - b(b+1)))), border averaged."""
    (kh, kw), (h, w) = kernel_size, input_hw
    a, b = (kh - 1) / 2, (kw - 1) / 2
    return math.sqrt(h * w / ((kh * h - a * (a + 1)) * (kw * w - b * (b + 1))))


def test_conv_kernel_with_border_averaged_factor_is_certified_from_its_weights():
    """A kernel normalised with deel-lip's border-averaged factor is not 1-Lipschitz; the bound says so."""
    factor = _deel_lip_border_averaged_factor((3, 3), (16, 16))
    assert factor > 1 / 3  # larger than the worst-case 1 / sqrt(overlap)
    layer = L.LipschitzConv2D(1, 3, padding="same")
    layer(np.zeros((1, 16, 16, 1), np.float32))
    layer.kernel.assign(np.full((3, 3, 1, 1), factor / 3, np.float32))  # ||K||_2 = factor
    exact = np.linalg.norm(explicit_matrix(layer, (16, 16, 1)), 2)
    lip = float(layer.lipschitz_constant())
    assert lip == pytest.approx(3 * factor, rel=1e-5)
    assert exact > 1.01, "the border-averaged kernel should exceed the intended constant 1"
    assert exact <= lip * (1 + RTOL)
    tightness("conv 3x3 border-averaged kernel operator norm / lipschitz_constant", exact / lip)


def test_conv_lipschitz_bound_by_power_iteration_on_a_larger_input():
    """x -> conv^T conv x by tape gradients (no explicit matrix), 20x20x3 input, several geometries."""
    for kernel, strides in ((3, 1), (5, 2), ((4, 3), (1, 2))):
        layer = L.LipschitzConv2D(4, kernel, strides=strides, padding="same")
        x = tf.random.normal((1, 20, 20, 3))
        layer(x)
        for _ in range(40):
            with tf.GradientTape() as tape:
                tape.watch(x)
                energy = 0.5 * tf.reduce_sum(tf.square(layer(x)))
            g = tape.gradient(energy, x)  # = A^T A x
            x = g / tf.norm(g)
        estimate = float(tf.norm(layer(x)))
        lip = float(layer.lipschitz_constant())
        assert estimate <= lip * (1 + RTOL)
        tightness(f"conv k{kernel} s{strides} 20x20 power iteration / lipschitz_constant", estimate / lip)


@pytest.mark.parametrize("strides", [(1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_strided_pointwise_conv_on_a_batch_of_one(strides, padding):
    """oneDNN's Conv2DBackpropFilter corrupts the heap for a 1x1 kernel with strides (1, 2) on a batch of one.

    LipschitzConv2D computes it as subsampling then an unstrided 1x1 conv: the
    same outputs and kernel gradients as the textbook formula, with no crash.
    """
    layer = L.LipschitzConv2D(3, 1, strides=strides, padding=padding)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 6, 8, 2)), tf.float32)
    for _ in range(5):  # the corruption shows up as a crash after a few calls
        with tf.GradientTape() as tape:
            out = layer(x)
            loss = tf.reduce_sum(tf.square(out))
        grad = tape.gradient(loss, layer.kernel).numpy()
    sub = x.numpy()[:, :: strides[0], :: strides[1], :]
    kernel = layer.kernel.numpy()[0, 0]
    np.testing.assert_allclose(out.numpy(), sub @ kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[0, 0], 2 * np.einsum("bhwi,bhwo->io", sub, sub @ kernel), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(activation="relu"),
        dict(dilation_rate=2),
        dict(groups=2),
        dict(data_format="channels_first"),
        dict(use_bias=True),
        dict(kernel_constraint="non_neg"),
        dict(padding="causal"),
    ],
)
def test_conv_refuses_arguments_that_would_break_the_bounds(bad):
    with pytest.raises(ValueError):
        L.LipschitzConv2D(2, 3, **bad)


# ---------------------------------------------------------------------------------------------
# LipschitzDense
# ---------------------------------------------------------------------------------------------

DENSE_SHAPES = [((6,), 4), ((5,), 8), ((3, 6), 4), ((2, 3, 5), 3)]
CONSTRAINTS = ["orthogonal", "spectral", "frobenius"]


def make_dense(shape, units, constraint, target=1.0, bias_bound=0.6):
    layer = L.LipschitzDense(units, weight_constraint=constraint, lipschitz_target=target, bias_bound=bias_bound)
    layer(np.zeros((1,) + shape, np.float32))
    if bias_bound:
        nonzero_bias(layer)
    return layer


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("shape, units", DENSE_SHAPES)
@pytest.mark.parametrize("target", [0.5, 2.0])
def test_dense_constraint_targets_and_certified_norm(shape, units, constraint, target):
    layer = make_dense(shape, units, constraint, target)
    layer.kernel.assign(layer.kernel_constraint(tf.random.normal(layer.kernel.shape) * 10.0))
    w = layer.kernel.numpy().astype(np.float64)
    exact = np.linalg.norm(w, 2)
    certified = float(layer.lipschitz_constant())
    assert certified >= exact
    assert certified <= exact * (1 + 1e-5)
    singular = np.linalg.svd(w, compute_uv=False)
    if constraint == "spectral":
        assert exact <= target * (1 + 1e-5)
        assert exact == pytest.approx(target, rel=1e-4)  # a big matrix is rescaled onto the target
    elif constraint == "frobenius":
        assert np.linalg.norm(w) <= target * (1 + 1e-6)
        assert np.linalg.norm(w) == pytest.approx(target, rel=1e-5)
    else:
        np.testing.assert_allclose(singular, target, rtol=1e-3)  # Bjorck: every singular value ~ target


def _adversarial_matrices(rng):
    """Matrices where an eigen-solver or a cheap norm estimate could under-estimate ``||W||_2``."""
    yield "gaussian", rng.normal(size=(37, 11))
    yield "wide", rng.normal(size=(5, 64))
    u, _, vt = np.linalg.svd(rng.normal(size=(40, 16)), full_matrices=False)
    yield "orthonormal", u @ vt  # every singular value 1: no gap at the top
    yield "near-tie", (u * np.r_[1.0, 1.0 - 1e-7, np.linspace(0.9, 0.1, 14)]) @ vt
    yield "ill-conditioned", (u * np.logspace(0, -7, 16)) @ vt
    yield "rank one", np.outer(rng.normal(size=40), rng.normal(size=16))
    yield "one entry", np.pad([[3.0]], [(0, 9), (0, 4)])
    yield "huge", rng.normal(size=(20, 8)) * 1e18
    yield "tiny", rng.normal(size=(20, 8)) * 1e-18
    yield "lattice", rng.integers(-2, 3, size=(24, 12)).astype(float)
    yield "zero", np.zeros((6, 3))


def test_certified_spectral_norm_is_an_upper_bound_of_the_svd_norm():
    rng = np.random.default_rng(10)
    for name, matrix in _adversarial_matrices(rng):
        weights = matrix.astype(np.float32)  # the weights in use are float32
        exact = np.linalg.norm(weights.astype(np.float64), 2)
        for m in (weights, weights.T):
            certified = float(L.certified_spectral_norm(tf.constant(m)))
            assert certified >= exact, name
            assert certified <= exact * (1 + 2e-6) + 1e-300, name  # NUMERICAL_MARGIN 1e-6, not looser


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 3, 2, 8), (3, 3, 16, 32), (300, 10)])
def test_orthogonal_constraint_is_deterministic_and_orthonormalises(shape):
    constraint = L.linear.OrthogonalConstraint(k_coef_lip=0.5)
    rng = np.random.default_rng(11)
    start = tf.constant(rng.normal(size=shape).astype(np.float32) * 10.0)
    projected = constraint(start)
    np.testing.assert_array_equal(constraint(start).numpy(), projected.numpy())  # no random start vector
    singular = np.linalg.svd(projected.numpy().reshape(-1, shape[-1]).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(singular, 0.5, rtol=1e-3)
    step = tf.function(lambda w: constraint(w + 1e-2 * tf.random.normal(shape)))  # as after optimiser updates
    w = projected
    for _ in range(5):
        w = step(w)
    singular = np.linalg.svd(w.numpy().reshape(-1, shape[-1]).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(singular, 0.5, rtol=1e-3)


def test_orthogonal_constraint_config_round_trips_and_is_the_layer_default():
    constraint = L.linear.OrthogonalConstraint(k_coef_lip=2.0, maxiter_bjorck=7)
    restored = tf.keras.constraints.deserialize(json.loads(json.dumps(tf.keras.constraints.serialize(constraint))))
    assert type(restored) is L.linear.OrthogonalConstraint
    assert restored.get_config() == constraint.get_config()
    assert isinstance(L.LipschitzDense(3).kernel_constraint, L.linear.OrthogonalConstraint)
    assert isinstance(L.LipschitzConv2D(3, 3).kernel_constraint, L.linear.OrthogonalConstraint)


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("shape, units", DENSE_SHAPES)
def test_dense_operator_norm_output_and_cotangent_bounds(shape, units, constraint):
    layer = make_dense(shape, units, constraint)
    for scale in (1.0, 3.0):  # 3.0: kernel far over its constraint (lip-dp trap)
        layer.kernel.assign(layer.kernel * scale)
        matrix = explicit_matrix(layer, shape)
        lip = float(layer.lipschitz_constant())
        exact = np.linalg.norm(matrix, 2)
        assert exact <= lip * (1 + RTOL)
        assert exact == pytest.approx(np.linalg.norm(layer.kernel.numpy().astype(np.float64), 2), rel=1e-5)
        radius = 1.7
        offset = layer(np.zeros((1,) + shape, np.float32)).numpy().reshape(-1).astype(np.float64)
        xs = np.concatenate(
            [
                radius * unit(np.random.default_rng(0).normal(size=(4, matrix.shape[0]))),
                worst_output_inputs(matrix, offset, radius),
            ]
        )
        out = layer(xs.reshape((-1,) + shape).astype("float32"))
        bound = float(layer.output_bound(f64(radius)))
        assert np.all(norms(out) <= bound * (1 + RTOL))
        tightness(f"dense {shape}->{units} {constraint} x{scale} output / output_bound", norms(out).max() / bound)

        _, _, vt = np.linalg.svd(matrix, full_matrices=False)
        z = tf.constant(vt[:1].reshape((1,) + tuple(layer.compute_output_shape((1,) + shape)[1:])), tf.float32)
        x = tf.Variable(xs[:1].reshape((1,) + shape).astype("float32"))
        with tf.GradientTape() as tape:
            out = layer(x)
        grad_norm = norms(tape.gradient(out, x, output_gradients=z))[0]
        cot_bound = float(layer.input_cotangent_bound(f64(1.0)))
        assert grad_norm <= cot_bound * (1 + RTOL)
        assert grad_norm == pytest.approx(cot_bound, rel=1e-4)  # top singular vector attains it


@pytest.mark.parametrize("shape, units", DENSE_SHAPES)
def test_dense_kernel_gradient_bound_attained_by_rank_one_inputs(shape, units):
    layer = make_dense(shape, units, "orthogonal")
    rng = np.random.default_rng(7)
    lead = shape[:-1]
    a = rng.normal(size=lead) if lead else np.array(1.0)
    u, v = rng.normal(size=shape[-1]), rng.normal(size=units)
    x_rank1 = (np.multiply.outer(a, u) * 3.0)[None]
    z_rank1 = (np.multiply.outer(a, v) * 0.2)[None]
    x = np.concatenate([x_rank1, rng.normal(size=(3,) + shape)]).astype("float32")
    z = np.concatenate([z_rank1, rng.normal(size=(3,) + lead + (units,))]).astype("float32")
    ratios = []
    for i, (g_kernel, g_bias) in enumerate(kernel_gradient(layer, x, z)):
        xi, zi = x[i].reshape(-1, shape[-1]).astype(np.float64), z[i].reshape(-1, units).astype(np.float64)
        np.testing.assert_allclose(g_kernel.numpy(), xi.T @ zi, rtol=1e-4, atol=1e-5)
        (_, kb), (_, bb) = layer.gradient_bounds(f64(np.linalg.norm(xi)), f64(np.linalg.norm(zi)))
        assert float(kb) == pytest.approx(np.linalg.norm(xi) * np.linalg.norm(zi), rel=1e-6)
        assert np.linalg.norm(g_kernel.numpy()) <= float(kb) * (1 + RTOL)
        assert np.linalg.norm(g_bias.numpy()) <= float(bb) * (1 + RTOL)
        ratios.append(np.linalg.norm(g_kernel.numpy()) / float(kb))
    assert ratios[0] == pytest.approx(1.0, rel=1e-4)  # rank-one x and z attain ||x|| ||z||
    tightness(f"dense {shape} kernel gradient (rank one) / bound", ratios[0])


@pytest.mark.parametrize("shape, units", DENSE_SHAPES)
def test_dense_bias_trap_sqrt_positions_is_attained(shape, units):
    layer = make_dense(shape, units, "spectral")
    positions = math.prod(shape[:-1])
    assert layer.positions == positions
    out = layer(np.zeros((1,) + shape, np.float32))
    bound = float(layer.output_bound(f64(0.0)))
    assert norms(out)[0] <= bound * (1 + RTOL)
    assert norms(out)[0] == pytest.approx(bound, rel=1e-4)
    z = np.broadcast_to(np.random.default_rng(8).normal(size=units), (1,) + shape[:-1] + (units,))
    x = np.random.default_rng(9).normal(size=(1,) + shape)
    assert_bias_gradient_bound_attained(layer, x, z, f"dense {shape} bias trap")


def test_dense_without_bias_has_only_a_kernel_bound():
    layer = make_dense((4,), 3, "spectral", bias_bound=None)
    assert not layer.use_bias and len(layer.trainable_variables) == 1
    assert [v for v, _ in layer.gradient_bounds(f64(1.0), f64(1.0))] == [layer.kernel]
    assert float(layer.output_bound(f64(0.0))) == 0.0
    with pytest.raises(ValueError):
        L.LipschitzDense(3, bias_bound=-1.0)
    with pytest.raises(ValueError):
        L.LipschitzDense(3, weight_constraint="nuclear")
    with pytest.raises(ValueError):
        L.LipschitzDense(3, activation="relu")


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_layer_reused_on_more_positions_is_refused(kind):
    """The bias bounds count positions: a second call with more positions would exceed them."""
    if kind == "conv":
        layer = L.LipschitzConv2D(2, 3, bias_bound=1.0)
        small, large = (1, 4, 4, 1), (1, 8, 8, 1)
    else:
        layer = L.LipschitzDense(2, bias_bound=1.0)
        small, large = (1, 3), (1, 5, 3)
    layer(tf.zeros(small))
    layer.bias.assign([0.6, 0.8])
    with pytest.raises(ValueError, match="incompatible with the layer"):
        layer(tf.zeros(large))


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "groupsort2": lambda: L.GroupSort(2),
    "groupsort4": lambda: L.GroupSort(4),
    "fullsort": L.FullSort,
    "relu": L.ReLU,
    "abs": L.Abs,
}


def _jacobian_matrices(layer, x):
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
    jac = tape.batch_jacobian(out, x).numpy().astype(np.float64)
    return jac.reshape(len(jac), math.prod(out.shape[1:]), -1)


def _numpy_activation(name, x):
    if name == "relu":
        return np.maximum(x, 0)
    if name == "abs":
        return np.abs(x)
    if name == "groupsort2":  # channel i is paired with channel i + C/2
        first, second = np.split(x, 2, axis=-1)
        return np.concatenate([np.minimum(first, second), np.maximum(first, second)], axis=-1)
    group = {"groupsort4": 4, "fullsort": x.shape[-1]}[name]
    return np.sort(x.reshape(x.shape[:-1] + (-1, group)), axis=-1).reshape(x.shape)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 4)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_bounds_and_jacobian(name, shape):
    layer = ACTIVATIONS[name]()
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(size=(4,) + shape) * 3, -np.abs(rng.normal(size=(1,) + shape))]).astype("float32")
    out = layer(x).numpy()
    np.testing.assert_allclose(out, _numpy_activation(name, x), atol=0)
    bound = float(layer.output_bound(f64(1.0)))
    assert bound == 1.0 and float(layer.lipschitz_constant()) == 1.0
    assert float(layer.input_cotangent_bound(f64(2.5))) == 2.5
    assert layer.gradient_bounds(f64(1.0), f64(1.0)) == [] and not layer.trainable_variables
    assert np.all(norms(out) <= norms(x) * (1 + 1e-6))
    for jac in _jacobian_matrices(layer, x):
        op = np.linalg.norm(jac, 2)
        assert op <= 1 + 1e-6
        if name in ("groupsort2", "groupsort4", "fullsort", "abs"):
            np.testing.assert_allclose(jac.T @ jac, np.eye(jac.shape[1]), atol=1e-6)  # (signed) permutation
    if name != "relu":
        np.testing.assert_allclose(norms(out), norms(x), rtol=1e-6)


@pytest.mark.parametrize("name", ["groupsort2", "groupsort4", "fullsort"])
def test_sorting_backward_pass_is_a_permutation_at_exact_ties(name):
    """At ties tf.minimum/tf.maximum both route their cotangent to one input (norm sqrt 2)."""
    layer = ACTIVATIONS[name]()
    tied = np.array(
        [[0.5] * 8, [0.5, -1, 2, 0.5, 0.5, -1, 2, 0.5], [0.0] * 8, [1, 1, 1, 1, -3, -3, -3, -3]], dtype="float32"
    )
    for jac in _jacobian_matrices(layer, tied):
        np.testing.assert_array_equal(jac.T @ jac, np.eye(8))


def test_groupsort_tie_does_not_break_the_kernel_bound():
    """The review's reproduction: identity kernel, tied pre-activations, ratio was sqrt 2."""
    model = tf.keras.Sequential(
        [tf.keras.Input((2,)), L.InputNormClip(1.0), L.LipschitzDense(2), L.GroupSort(), L.LipschitzDense(2)]
    )
    model.compile(loss=losses.TauCategoricalCrossentropy(100.0))
    model.layers[1].kernel.assign(np.eye(2))
    model.layers[3].kernel.assign(np.diag([1.0, -1.0]))
    x = np.array([[0.70710677, 0.70710677]], "float32")
    result = verification.verify_bounds(model, x, np.array([[0.0, 1.0]], "float32"), rtol=0)
    assert not result.violations
    assert result.max_ratio > 0.999  # attained up to the rounding margins: the check is not vacuous


def test_groupsort_refuses_bad_groups():
    with pytest.raises(ValueError):
        L.GroupSort(3)(tf.zeros((1, 4)))
    with pytest.raises(ValueError):
        L.GroupSort(0)


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------

# (pool_size, strides, padding, input shape)
POOL_CASES = [
    (2, None, "valid", (6, 6, 2)),
    (2, None, "same", (5, 5, 2)),
    (3, 2, "same", (7, 7, 1)),
    (3, 1, "valid", (6, 6, 2)),
    ((2, 3), (1, 2), "same", (5, 7, 2)),
    (3, 3, "same", (7, 8, 1)),
    (2, 3, "valid", (7, 7, 1)),
    (3, 2, "valid", (7, 6, 1)),
]
POOL_IDS = [f"p{c[0]}-s{c[1]}-{c[2]}-{'x'.join(map(str, c[3]))}".replace(" ", "") for c in POOL_CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def numpy_pool(x, pool, strides, padding, kind):
    """Reference window pooling: zero padding (l2) / ignored padding (max), TF 'same' placement."""
    (kh, kw), (sh, sw) = _pair(pool), _pair(strides if strides is not None else pool)
    b, h, w, c = x.shape
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        top, left = ph // 2, pw // 2
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        top = left = 0
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * sh - top, j * sw - left
            rows = slice(max(r0, 0), min(r0 + kh, h))
            cols = slice(max(c0, 0), min(c0 + kw, w))
            window = x[:, rows, cols, :].astype(np.float64)
            if kind == "l2":
                out[:, i, j, :] = np.sqrt(np.square(window).sum(axis=(1, 2)))
            else:
                out[:, i, j, :] = window.max(axis=(1, 2))
    return out


def _delta_images(shape):
    n = math.prod(shape)
    return np.eye(n, dtype=np.float32).reshape((n,) + shape)


@pytest.mark.parametrize("kind", ["l2", "max"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_pooling_matches_reference_and_bounds(case, kind):
    pool, strides, padding, shape = case
    cls = L.L2NormPooling2D if kind == "l2" else L.MaxPooling2D
    layer = cls(pool_size=pool, strides=strides, padding=padding)
    overlap = expected_overlap(pool, strides if strides is not None else pool)
    assert layer.overlap == overlap
    assert float(layer.lipschitz_constant()) == pytest.approx(math.sqrt(overlap))
    assert layer.gradient_bounds(f64(1.0), f64(1.0)) == []

    rng = np.random.default_rng(11)
    x = np.concatenate(
        [rng.normal(size=(4,) + shape), -np.abs(rng.normal(size=(1,) + shape)), np.ones((1,) + shape)]
    ).astype("float32")
    out = layer(x).numpy()
    atol = 1e-5 if kind == "l2" else 0
    np.testing.assert_allclose(out, numpy_pool(x, pool, strides, padding, kind), atol=atol, rtol=1e-5)

    # output bound: random inputs and single pixels (a pixel in `overlap` windows attains sqrt(overlap))
    candidates = np.concatenate([x, _delta_images(shape) * 2.0])
    ratio = norms(layer(candidates)) / (float(layer.output_bound(f64(1.0))) * norms(candidates))
    assert ratio.max() <= 1 + RTOL
    tightness(f"{kind} pool {case} output / output_bound", ratio.max())
    assert ratio.max() == pytest.approx(1.0, abs=1e-4)  # every case has a pixel in `overlap` windows

    # Jacobian operator norm, at random points and at a spike (max pooling: one big pixel wins all its windows)
    spikes = _delta_images(shape)[rng.choice(math.prod(shape), 3, replace=False)] * 10
    points = np.concatenate([x[:4], spikes + rng.normal(size=spikes.shape).astype("float32") * 0.01])
    ops = [np.linalg.norm(j, 2) for j in _jacobian_matrices(layer, points)]
    lip = float(layer.lipschitz_constant())
    assert max(ops) <= lip * (1 + RTOL)
    tightness(f"{kind} pool {case} jacobian / lipschitz_constant", max(ops) / lip)


def test_l2_norm_pooling_same_padding_is_exact_at_borders():
    """Border windows hold fewer pixels: the l2 norm of what is there, never a rescaled average."""
    layer = L.L2NormPooling2D(pool_size=3, strides=2, padding="same")
    x = np.ones((1, 4, 4, 1), np.float32)
    out = layer(x).numpy()[0, :, :, 0]
    # TF 'same': 2 outputs per axis, total padding 1, put after: windows rows {0,1,2}, {2,3}
    np.testing.assert_allclose(out, np.sqrt([[9.0, 6.0], [6.0, 4.0]]), rtol=1e-6)
    assert np.linalg.norm(out) <= float(layer.output_bound(f64(np.linalg.norm(x)))) * (1 + RTOL)


def test_global_l2_norm_pooling():
    layer = L.GlobalL2NormPooling2D()
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.normal(size=(3, 4, 5, 3)), np.zeros((1, 4, 5, 3))]).astype("float32")
    out = layer(x).numpy()
    reference = np.sqrt(np.square(x.astype(np.float64)).sum(axis=(1, 2)))
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert np.all(norms(out) <= norms(x) * (1 + 1e-6))
    assert float(layer.output_bound(f64(2.0))) == 2.0 and float(layer.lipschitz_constant()) == 1.0
    ops = [np.linalg.norm(j, 2) for j in _jacobian_matrices(layer, x)]
    assert max(ops) <= 1 + 1e-6
    assert np.all(np.isfinite(ops))  # differentiable at 0
    tightness("global l2 pool jacobian / lipschitz_constant", max(ops))


# ---------------------------------------------------------------------------------------------
# LayerCentering, InputNormClip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [None, (1, 2), (3,), (1, 2, 3), (-1,), (2,)])
def test_layer_centering_is_per_sample(axes):
    layer = L.LayerCentering(axes=axes)
    rng = np.random.default_rng(13)
    sample = rng.normal(size=(1, 3, 4, 2)).astype("float32")
    others = np.concatenate([rng.normal(size=(2, 3, 4, 2)) * 1e4 + 5e3, np.full((1, 3, 4, 2), -7e3)])
    alone = layer(sample).numpy()
    batch = layer(np.concatenate([sample, others.astype("float32")])).numpy()
    np.testing.assert_allclose(batch[:1], alone, atol=1e-6)
    mean_axes = tuple(range(1, 4)) if axes is None else axes
    np.testing.assert_allclose(alone.mean(axis=mean_axes), 0, atol=1e-6)
    reference = sample - sample.astype(np.float64).mean(axis=mean_axes, keepdims=True)
    np.testing.assert_allclose(alone, reference, atol=1e-6)
    assert np.all(norms(alone) <= norms(sample) * (1 + 1e-6))
    jac = _jacobian_matrices(layer, np.concatenate([sample, others.astype("float32")]))
    assert max(np.linalg.norm(j, 2) for j in jac) <= 1 + 1e-5
    assert float(layer.output_bound(f64(3.0))) == 3.0 and float(layer.lipschitz_constant()) == 1.0


@pytest.mark.parametrize("axes", [(0,), (0, 1), [1, 0]])
def test_layer_centering_refuses_the_batch_axis(axes):
    with pytest.raises(ValueError, match="batch"):
        L.LayerCentering(axes=axes)


def test_layer_centering_refuses_a_negative_alias_of_the_batch_axis():
    layer = L.LayerCentering(axes=(-2,))
    x = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    with pytest.raises(ValueError, match="include the batch axis"):
        layer(x)


def test_input_norm_clip_bounds_and_identity_inside_the_ball():
    layer = L.InputNormClip(2.5)
    rng = np.random.default_rng(14)
    raw = rng.normal(size=(6, 3, 3, 2))
    raw = unit(raw) * np.array([0.1, 1.0, 2.4999, 2.5001, 10.0, 1e6])[:, None, None, None]
    x = raw.astype("float32")
    out = layer(x).numpy()
    assert np.all(norms(out) <= 2.5 * (1 + 1e-6))
    inside = norms(x) <= 2.5
    assert inside.sum() >= 3
    np.testing.assert_array_equal(out[inside], x[inside])  # untouched, bit for bit
    np.testing.assert_allclose(unit(out[~inside]), unit(x[~inside]), atol=1e-6)  # direction kept
    np.testing.assert_allclose(norms(out[~inside]), 2.5, rtol=1e-6)
    assert float(layer.output_bound(f64(1e9))) == 2.5
    ops = [np.linalg.norm(j, 2) for j in _jacobian_matrices(layer, x)]
    assert max(ops) <= 1 + 1e-5
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            L.InputNormClip(bad)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_input_norm_clip_refuses_non_finite_inputs(bad_value):
    layer = L.InputNormClip(1.0)
    x = np.ones((3, 4), np.float32)
    x[1, 2] = bad_value
    with pytest.raises(tf.errors.InvalidArgumentError):
        layer(x)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.function(layer)(tf.constant(x))
    inp = tf.keras.Input((4,))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(layer(inp)))
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.predict(x, verbose=0)


def test_input_norm_clip_projects_huge_finite_inputs():
    x = np.full((1, 4), 1e20, np.float32)
    out = L.InputNormClip(2.0)(x).numpy()
    assert norms(out)[0] <= 2.0 * (1 + 1e-6)
    np.testing.assert_allclose(out, np.full((1, 4), 1.0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Merges
# ---------------------------------------------------------------------------------------------


def test_add_and_average_bounds_in_a_functional_model():
    inp = tf.keras.Input((6,))
    h = L.InputNormClip(1.5)(inp)
    d1 = L.LipschitzDense(5, bias_bound=0.4)
    d2 = L.LipschitzDense(5, weight_constraint="spectral", lipschitz_target=2.0, bias_bound=0.3)
    d3 = L.LipschitzDense(5, weight_constraint="frobenius", bias_bound=0.2)
    h1, h2, h3 = d1(h), d2(h), d3(h)
    add, avg = L.Add(), L.Average()
    s, m = add([h1, h2]), avg([h1, h2, h3])
    model = tf.keras.Model(inp, [s, m, h1, h2, h3])
    for d in (d1, d2, d3):
        nonzero_bias(d)
    assert add.num_inputs == 2 and avg.num_inputs == 3 and add.multi_input

    branch = [d.output_bound(f64(1.5)) for d in (d1, d2, d3)]
    add_bound = float(add.output_bound(branch[:2]))
    avg_bound = float(avg.output_bound(branch))
    assert add_bound == pytest.approx(float(branch[0] + branch[1]))
    assert avg_bound == pytest.approx(float(sum(branch)) / 3)

    # inputs: random, beyond the clip, and ascent on ||Add output||
    x = tf.Variable(np.random.default_rng(15).normal(size=(8, 6)).astype("float32") * 3)
    for _ in range(30):
        with tf.GradientTape() as tape:
            objective = tf.reduce_sum(tf.square(model(x)[0])) + tf.reduce_sum(tf.square(model(x)[1]))
        g = tape.gradient(objective, x)
        x.assign_add(0.5 * g / tf.norm(g, axis=1, keepdims=True))
    s_out, m_out, o1, o2, o3 = [o.numpy() for o in model(x)]
    assert np.all(norms(s_out) <= add_bound * (1 + RTOL))
    assert np.all(norms(m_out) <= avg_bound * (1 + RTOL))
    tightness("Add output / output_bound (two dense branches, ascent)", norms(s_out).max() / add_bound)
    tightness("Average output / output_bound (three dense branches, ascent)", norms(m_out).max() / avg_bound)

    # attained with collinear inputs; cotangents are passed unchanged (Add) or divided by n (Average)
    v = tf.constant(np.random.default_rng(16).normal(size=(1, 5)), tf.float32)
    parts = [v, 2.0 * v, 0.5 * v]
    z = tf.constant(np.random.default_rng(17).normal(size=(1, 5)), tf.float32)
    for layer, inputs in ((add, parts[:2]), (avg, parts)):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = layer(inputs)
        grads = tape.gradient(out, inputs, output_gradients=z)
        bound = float(layer.output_bound([f64(norms(p)[0]) for p in inputs]))
        assert norms(out)[0] == pytest.approx(bound, rel=1e-5)
        cot_bounds = layer.input_cotangent_bound(f64(norms(z)[0]))
        assert len(cot_bounds) == len(inputs)
        for g, cb in zip(grads, cot_bounds):
            assert norms(g)[0] == pytest.approx(float(cb), rel=1e-5)


@pytest.mark.parametrize("merge", [L.Add, L.Average])
def test_merge_of_broadcast_shapes_is_refused(merge):
    """Broadcasting repeats an input over positions, multiplying its norm and cotangent."""
    with pytest.raises(ValueError, match="no broadcasting"):
        merge()([tf.zeros((1, 4, 4, 3)), tf.ones((1, 1, 1, 3))])


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------

CONFIG_LAYERS = [
    lambda: L.LipschitzDense(5, weight_constraint="spectral", lipschitz_target=2.0, bias_bound=0.3),
    lambda: L.LipschitzDense(4, weight_constraint="orthogonal"),
    lambda: L.LipschitzConv2D(
        3, (3, 2), strides=(2, 1), padding="valid", weight_constraint="frobenius", lipschitz_target=0.5, bias_bound=0.2
    ),
    lambda: L.GroupSort(4),
    L.FullSort,
    L.ReLU,
    L.Abs,
    lambda: L.L2NormPooling2D(3, 2, "same"),
    lambda: L.MaxPooling2D((2, 3), (1, 2), "same"),
    L.GlobalL2NormPooling2D,
    lambda: L.InputNormClip(2.5),
    lambda: L.LayerCentering((1, 2)),
    L.LayerCentering,
    L.Flatten,
    lambda: L.Reshape((-1, 2)),
    L.Add,
    L.Average,
    lambda: L.ClipGradient(0.1),
]


@pytest.mark.parametrize("factory", CONFIG_LAYERS, ids=lambda f: type(f()).__name__)
def test_get_config_round_trips(factory):
    layer = factory()
    config = layer.get_config()
    through_json = json.loads(json.dumps(config))
    clone = type(layer).from_config(through_json)
    assert type(clone) is type(layer)
    assert json.loads(json.dumps(clone.get_config())) == through_json
    restored = tf.keras.layers.deserialize(json.loads(json.dumps(tf.keras.layers.serialize(layer))))
    assert type(restored) is type(layer)
    assert tf.keras.utils.get_registered_name(type(layer)) == f"lipdp>{type(layer).__name__}"
    for attr in (
        "weight_constraint",
        "lipschitz_target",
        "bias_bound",
        "overlap",
        "pool_size",
        "strides",
        "padding",
        "group_size",
        "norm",
        "axes",
        "clip_value",
    ):
        if hasattr(layer, attr):
            assert getattr(restored, attr) == getattr(layer, attr), attr


def _every_layer_model():
    inp = tf.keras.Input((16, 16, 2))
    h = L.Scattering2D(J=1, L=4, normalize="group", groups=2)(inp)  # 8 x 8 x 10
    h = L.ChannelStandardization(
        np.linspace(-0.5, 0.5, 10), np.linspace(0.5, 2.0, 10), clip_norm=20.0, noise_multiplier=None
    )(h)
    h = L.InputNormClip(3.0)(h)
    h = L.LayerCentering(axes=(1, 2))(h)
    h = L.LipschitzConv2D(4, 3, bias_bound=0.5)(h)
    h = L.GroupSort(2)(h)
    h = L.LipschitzConv2D(4, (3, 2), strides=(2, 1), weight_constraint="spectral", bias_bound=0.4)(h)
    branch = L.ReLU()(h)
    branch = L.LipschitzConv2D(4, 1, weight_constraint="frobenius", bias_bound=0.3)(branch)
    h = L.Add()([h, branch])
    h = L.Average()([h, L.Abs()(h)])
    h = L.FullSort()(h)
    h = L.MaxPooling2D(pool_size=3, strides=2, padding="same")(h)  # 2 x 4
    h = L.L2NormPooling2D(pool_size=2, strides=1, padding="same")(h)  # 2 x 4
    g = L.GlobalL2NormPooling2D()(h)
    f = L.LipschitzDense(4, weight_constraint="spectral", bias_bound=0.2)(L.Flatten()(h))
    h = L.Add()([g, f])
    h = L.Reshape((2, 2))(h)
    h = L.LipschitzDense(4, bias_bound=0.3)(h)  # two positions
    h = L.AdaptiveClipGradient(0.4)(L.ClipGradient(0.5)(L.Flatten()(h)))
    out = L.LipschitzDense(3, bias_bound=0.5)(h)
    model = tf.keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=losses.TauCategoricalCrossentropy(tau=3.0))
    for layer in model.layers:
        if getattr(layer, "use_bias", False):
            nonzero_bias(layer)
    return model


def test_model_with_every_layer_saves_and_loads(tmp_path):
    model = _every_layer_model()
    types = {type(layer) for layer in model.layers}
    expected = {
        getattr(L, n)
        for n in L.__all__
        if isinstance(getattr(L, n), type) and issubclass(getattr(L, n), tf.keras.layers.Layer)
    }
    assert expected <= types, expected - types
    x = np.random.default_rng(18).normal(size=(5, 16, 16, 2)).astype("float32")
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for old, new in zip(model.layers, loaded.layers):
        if isinstance(old, L.DPLayer):
            assert float(new.lipschitz_constant()) == float(old.lipschitz_constant())
        if hasattr(old, "positions"):
            assert new.positions == old.positions
    for old, new in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(old.numpy(), new.numpy())
    assert isinstance(loaded.loss, losses.TauCategoricalCrossentropy) and loaded.loss.tau == 3.0


def test_stand_in_is_added_only_to_an_empty_batch_and_dropped_again():
    from lipdp.tf_workarounds import with_stand_in_for_empty_batch, without_stand_in

    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    np.testing.assert_array_equal(with_stand_in_for_empty_batch(x).numpy(), x)
    stand_in = with_stand_in_for_empty_batch(x[:0])
    np.testing.assert_array_equal(stand_in.numpy(), np.zeros((1, 3, 4)))
    assert without_stand_in(stand_in, 0).shape == (0, 3, 4)
    np.testing.assert_array_equal(without_stand_in(tf.constant(x), 2).numpy(), x)

    @tf.function(input_signature=[tf.TensorSpec((None, 3, 4))])
    def round_trip(batch):
        padded = with_stand_in_for_empty_batch(batch)
        assert padded.shape.as_list() == [None, 3, 4]  # the static example shape survives
        return without_stand_in(padded, tf.shape(batch)[0])

    assert round_trip(x[:0]).shape == (0, 3, 4)
    np.testing.assert_array_equal(round_trip(x).numpy(), x)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32)])
    def unknown_rank(labels):
        return without_stand_in(with_stand_in_for_empty_batch(labels), tf.shape(labels)[0])

    assert unknown_rank(np.zeros((0, 3), "int32")).shape == (0, 3)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("bias_bound", [None, 0.5])
@pytest.mark.parametrize("kernel_size, strides", [(3, 1), (3, 2), (1, 2)])
def test_conv_forward_graph_takes_an_empty_batch(padding, bias_bound, kernel_size, strides):
    """A forward-only graph (predict, a frozen layer): oneDNN may fuse what precedes a VALID convolution."""
    layer = L.LipschitzConv2D(5, kernel_size, strides=strides, padding=padding, bias_bound=bias_bound)
    layer.build((None, 7, 7, 2))
    forward = tf.function(layer, input_signature=[tf.TensorSpec((None, 7, 7, 2))])
    expected = tuple(layer.compute_output_shape((None, 7, 7, 2))[1:])
    assert tuple(forward(tf.zeros((0, 7, 7, 2))).shape) == (0, *expected)
    x = tf.random.stateless_normal((3, 7, 7, 2), seed=(0, 1))
    np.testing.assert_allclose(forward(x).numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
