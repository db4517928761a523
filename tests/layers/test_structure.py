"""LayerCentering, InputNormClip and the merges (lipdp/layers/structure.py): bounds against independent computations."""

import numpy as np
import pytest
import tensorflow as tf
from layer_checks import RTOL, f64, jacobian_matrices, nonzero_bias, norms, tightness, unit

import lipdp.layers as L


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
    jac = jacobian_matrices(layer, np.concatenate([sample, others.astype("float32")]))
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
    ops = [np.linalg.norm(j, 2) for j in jacobian_matrices(layer, x)]
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


@pytest.mark.parametrize("max_norm", [0.1, 0.3, 1e-3])
def test_clip_per_sample_holds_a_python_number_clip_exactly_in_float64(max_norm):
    """float64 samples projected onto a clip given as a Python float: no rounding through float32."""
    from lipdp.layers.structure import clip_per_sample

    x = np.random.default_rng(0).normal(size=(64, 7))
    clipped = clip_per_sample(tf.constant(x, tf.float64), max_norm).numpy()
    assert norms(clipped).max() <= max_norm * (1 + 1e-12)


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
