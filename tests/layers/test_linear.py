"""LipschitzConv2D and LipschitzDense (lipdp/layers/linear.py): bounds against independent computations."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from layer_checks import (
    RTOL,
    assert_bias_gradient_bound_attained,
    expected_overlap,
    explicit_matrix,
    f64,
    kernel_gradient,
    nonzero_bias,
    norms,
    tightness,
    unit,
    worst_output_inputs,
)

import lipdp.layers as L

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
