"""Bounds against true per-sample gradient norms, on composed networks.

For every architecture: random inputs, inputs scaled to the norm bound, inputs
found by gradient ascent on the per-sample gradient norm, and all of it again
after optimiser steps (constraints applied) -- with non-zero biases. The
tightness (max true/bound ratio) is logged, never asserted away.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
from deel.lip.losses import HKR

import lipdp.layers as L
from lipdp import losses, sensitivity, verification
from lipdp.layers.base import ROUNDING_MARGIN

log = logging.getLogger(__name__)
RTOL = 1e-5
INPUT_NORM = 2.5


def _image_input(shape=(8, 8, 2)):
    inp = tf.keras.Input(shape)
    return inp, L.InputNormClip(INPUT_NORM)(inp)


def deep_dense():
    inp = tf.keras.Input((12,))
    h = L.InputNormClip(INPUT_NORM)(inp)
    for units, constraint in ((16, "orthogonal"), (16, "spectral"), (8, "frobenius"), (16, "orthogonal")):
        h = L.LipschitzDense(units, weight_constraint=constraint, bias_bound=0.7)(h)
        h = L.GroupSort()(h)
    return inp, L.LipschitzDense(4, bias_bound=0.5)(h), losses.TauCategoricalCrossentropy(4.0)


def conv_pool_dense():
    inp, h = _image_input()
    h = L.LipschitzConv2D(6, 3, padding="same", bias_bound=0.8)(h)
    h = L.GroupSort()(h)
    h = L.LipschitzConv2D(6, 3, strides=2, padding="valid", bias_bound=0.3)(h)
    h = L.Abs()(h)
    h = L.L2NormPooling2D(pool_size=2, padding="same")(h)
    h = L.Flatten()(h)
    return inp, L.LipschitzDense(4, bias_bound=0.5)(h), losses.MulticlassHinge()


def conv_overlapping_pools():
    inp, h = _image_input((9, 9, 1))
    h = L.LayerCentering(axes=(1, 2))(h)
    h = L.LipschitzConv2D(4, (3, 2), strides=(2, 1), padding="same", weight_constraint="spectral", bias_bound=1.0)(h)
    h = L.FullSort()(h)
    h = L.MaxPooling2D(pool_size=3, strides=2, padding="same")(h)
    h = L.L2NormPooling2D(pool_size=2, strides=1)(h)
    h = L.GlobalL2NormPooling2D()(h)
    return inp, L.LipschitzDense(3, bias_bound=0.5)(h), losses.HingeKR(alpha=5.0)


def residual():
    inp, h = _image_input()
    h = L.LipschitzConv2D(4, 3, bias_bound=0.5)(h)
    h = L.GroupSort()(h)
    for merge in (L.Add(), L.Average()):
        branch = L.LipschitzConv2D(4, 3, bias_bound=0.5)(h)
        branch = L.ReLU()(branch)
        branch = L.LipschitzConv2D(4, 1, bias_bound=0.2)(branch)
        h = merge([h, branch])
    h = L.LayerCentering()(h)
    h = L.Reshape((-1,))(h)
    return inp, L.LipschitzDense(5, bias_bound=0.5)(h), losses.KCosineSimilarity(K=2.0)


def gradient_clipped():
    inp = tf.keras.Input((10,))
    h = L.InputNormClip(INPUT_NORM)(inp)
    h = L.LipschitzDense(16, bias_bound=0.5)(h)
    h = L.GroupSort()(h)
    h = L.ClipGradient(0.05)(h)
    h = L.LipschitzDense(8, bias_bound=0.5)(h)
    h = L.GroupSort()(h)
    out = L.LipschitzDense(3, lipschitz_target=5.0, bias_bound=0.5)(h)
    return inp, out, losses.HingeKR(alpha=20.0)


ARCHITECTURES = {
    f.__name__: f for f in (deep_dense, conv_pool_dense, conv_overlapping_pools, residual, gradient_clipped)
}


def build(name, seed=0):
    tf.keras.utils.set_random_seed(seed)
    inp, out, loss = ARCHITECTURES[name]()
    model = tf.keras.Model(inp, out)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss=loss)
    for variable in model.trainable_variables:
        if "bias" in variable.name:  # non-zero biases, pushed to their norm bound
            variable.assign(variable.constraint(tf.random.normal(variable.shape) * 10.0))
    return model


def data(model, n=12, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")
    classes = model.output_shape[-1]
    y = tf.one_hot(rng.integers(0, classes, n), classes).numpy()
    return x, y


def at_norm_bound(x):
    norms = np.linalg.norm(x.reshape(len(x), -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x * INPUT_NORM / norms).astype("float32")


def check(model, x, y, label):
    result = verification.verify_bounds(model, x, y, rtol=RTOL)
    log.warning("tightness %-40s max_ratio=%.4f", label, result.max_ratio)
    assert result.max_ratio > 0
    assert not result.violations, f"{label}: bound violations {result.violations[:5]}"
    return result


def train_a_few_steps(model, x, y, steps=5):
    for _ in range(steps):  # keras fit applies the kernel/bias constraints after each update
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_no_violation_random_scaled_and_adversarial(name):
    model = build(name)
    x, y = data(model)
    check(model, x, y, f"{name}/random")
    check(model, at_norm_bound(x), y, f"{name}/at norm bound")
    adversarial = verification.worst_case_inputs(model, x, y, steps=8)
    check(model, adversarial, y, f"{name}/gradient ascent")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_no_violation_after_training_steps(name):
    model = build(name)
    x, y = data(model, n=16)
    before = [v.numpy().copy() for v in model.trainable_variables]
    train_a_few_steps(model, x, y)
    moved = [not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert any(moved), "training did not move the weights"
    check(model, x, y, f"{name}/trained")
    check(model, verification.worst_case_inputs(model, x, y, steps=8), y, f"{name}/trained adversarial")


def test_bounds_follow_weights_that_break_their_constraint():
    """Certified, not intended: a kernel 1.5x over its constraint raises the bounds."""
    model = build("deep_dense")
    x, y = data(model)
    before = sensitivity.compute_bounds(model)
    dense = [layer for layer in model.layers if isinstance(layer, L.LipschitzDense)][0]
    dense.kernel.assign(dense.kernel * 1.5)
    after = sensitivity.compute_bounds(model)
    assert float(dense.lipschitz_constant()) == pytest.approx(1.5, rel=1e-3)
    output_kernel = sensitivity.variable_names(model)[-2]
    assert after[output_kernel] > before[output_kernel] * 1.1
    check(model, x, y, "deep_dense/kernel 1.5x")
    check(model, verification.worst_case_inputs(model, x, y, steps=8), y, "deep_dense/kernel 1.5x adversarial")


def test_every_variable_is_bounded_and_named():
    model = build("residual")
    bounds = sensitivity.compute_bounds(model)
    names = sensitivity.variable_names(model)
    assert list(bounds) == names and len(set(names)) == len(model.trainable_variables)
    assert all(name.split("/")[0] in {layer.name for layer in model.layers} for name in names)
    assert all(np.isfinite(b) and b > 0 for b in bounds.values())


def test_shared_layer_gets_the_sum_of_its_calls():
    inp = tf.keras.Input((6,))
    h = L.InputNormClip(1.0)(inp)
    shared = L.LipschitzDense(6, bias_bound=0.3)
    h = shared(L.GroupSort()(shared(h)))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(h))
    model.compile(loss=losses.TauCategoricalCrossentropy())
    shared.bias.assign(shared.bias_constraint(tf.ones(6)))
    x, y = data(model)
    check(model, x, y, "shared layer")
    check(model, verification.worst_case_inputs(model, x, y, steps=8), y, "shared layer adversarial")


def test_gradient_clip_rule_is_min_of_loss_lipschitz_and_clip():
    model = build("gradient_clipped")
    records = {r.layer.name: r for r in sensitivity.propagate(model)}
    clip = next(r for r in records.values() if isinstance(r.layer, L.ClipGradient))
    assert float(clip.layer.input_cotangent_bound(clip.cotangent_bound)) == pytest.approx(
        min(float(clip.cotangent_bound), 0.05)
    )
    first_dense = model.layers[2]
    # 0.05 after the clip, then the rounding margin of the clip's and the GroupSort's stated bounds
    assert float(records[first_dense.name].cotangent_bound) == pytest.approx(0.05 * (1 + ROUNDING_MARGIN) ** 2)


def test_gradient_clip_layer_clips_each_sample_cotangent():
    layer = L.ClipGradient(0.5)
    x = tf.random.normal((4, 3, 3))
    upstream = tf.random.normal((4, 3, 3)) * tf.constant([0.1, 1.0, 10.0, 0.0])[:, None, None]
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
    grad = tape.gradient(out, x, output_gradients=upstream)
    np.testing.assert_allclose(out, x)
    norms = tf.norm(tf.reshape(grad, (4, -1)), axis=1).numpy()
    upstream_norms = tf.norm(tf.reshape(upstream, (4, -1)), axis=1).numpy()
    np.testing.assert_allclose(norms, np.minimum(upstream_norms, 0.5), rtol=1e-5)


def test_report_lists_every_layer_and_global_sensitivity():
    model = build("conv_pool_dense")
    text = sensitivity.report(model)
    for layer in model.layers[1:]:
        assert layer.name in text
    assert "global sensitivity" in text


@pytest.mark.parametrize(
    "bad_layer, expected",
    [
        (lambda: tf.keras.layers.Dense(4), "LipschitzDense"),
        (lambda: tf.keras.layers.BatchNormalization(), "batch statistics mix samples"),
        (lambda: tf.keras.layers.Dropout(0.5), "Dropout"),
        (lambda: tf.keras.layers.Activation("tanh"), "GroupSort"),
    ],
)
def test_non_lipschitz_layers_are_refused_with_a_hint(bad_layer, expected):
    inp = tf.keras.Input((8,))
    h = L.InputNormClip(1.0)(inp)
    h = bad_layer()(h)
    model = tf.keras.Model(inp, L.LipschitzDense(2)(h))
    model.compile(loss=losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match=expected):
        sensitivity.compute_bounds(model)


def test_every_problem_is_reported_at_once():
    """No input clip, a non-Lipschitz layer, a plain loss and a 3-d output: one error names all four."""
    inp = tf.keras.Input((4, 8))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(tf.keras.layers.Dense(8)(inp)))
    model.compile(loss="categorical_crossentropy")
    with pytest.raises(sensitivity.ModelNotSupportedError) as error:
        sensitivity.validate(model)
    message = str(error.value)
    assert message.startswith("4 problems: (1) ")
    for expected in (
        "Lipschitz constant",
        "use lipdp.layers.LipschitzDense",
        "shape (batch, classes)",
        "InputNormClip",
    ):
        assert expected in message


def test_deel_lip_reparameterised_layer_is_refused():
    from deel.lip.layers import SpectralDense

    inp = tf.keras.Input((8,))
    model = tf.keras.Model(inp, SpectralDense(2)(L.InputNormClip(1.0)(inp)))
    model.compile(loss=losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match="forward pass"):
        sensitivity.compute_bounds(model)


def test_model_without_input_clip_is_refused():
    inp = tf.keras.Input((8,))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(inp))
    model.compile(loss=losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match="InputNormClip"):
        sensitivity.compute_bounds(model)


def test_batch_dependent_hkr_loss_is_refused():
    inp = tf.keras.Input((8,))
    model = tf.keras.Model(inp, L.LipschitzDense(1)(L.InputNormClip(1.0)(inp)))
    model.compile(loss=HKR(alpha=10.0))
    with pytest.raises(sensitivity.ModelNotSupportedError, match="class counts"):
        sensitivity.compute_bounds(model)


def test_plain_keras_loss_is_refused():
    inp = tf.keras.Input((8,))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(L.InputNormClip(1.0)(inp)))
    model.compile(loss="categorical_crossentropy")
    with pytest.raises(sensitivity.ModelNotSupportedError, match="Lipschitz constant"):
        sensitivity.compute_bounds(model)


def test_nested_model_is_refused():
    inner = tf.keras.Sequential([tf.keras.Input((8,)), L.LipschitzDense(8)])
    inp = tf.keras.Input((8,))
    model = tf.keras.Model(inp, L.LipschitzDense(2)(inner(L.InputNormClip(1.0)(inp))))
    model.compile(loss=losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match="nested models"):
        sensitivity.compute_bounds(model)


def test_sequential_model_is_supported():
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8,)),
            L.InputNormClip(1.0),
            L.LipschitzDense(8, bias_bound=1.0),
            L.GroupSort(),
            L.LipschitzDense(3),
        ]
    )
    model.compile(loss=losses.TauCategoricalCrossentropy())
    x, y = data(model)
    check(model, x, y, "sequential")


def test_unbuilt_model_is_refused():
    model = tf.keras.Sequential([L.InputNormClip(1.0), L.LipschitzDense(3)])
    model.compile(loss=losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match="input shape"):
        sensitivity.compute_bounds(model)


def test_bounds_cover_float32_rounding_without_a_spectral_factor():
    """Input clip -> dense kernel with saturated tau-CE logits: the true norm is ||x|| sqrt 2 exactly.

    float32 clipping leaves ||x|| up to ~1e-7 above the clip norm, which
    exceeded the margin-free bound 1 * sqrt 2 in most samples; the rounding
    margin covers it (and the check is tight, so it is not vacuous).
    """
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((16,)), L.InputNormClip(1.0), L.LipschitzDense(4, bias_bound=0.5)])
    model.compile(loss=losses.TauCategoricalCrossentropy(1e4))
    x = (np.random.default_rng(0).normal(size=(400, 16)) * 1e3).astype("float32")
    wrong = (model.predict(x, verbose=0).argmax(axis=1) + 1) % 4
    result = verification.verify_bounds(model, x, np.eye(4, dtype="float32")[wrong], rtol=0)
    assert not result.violations, result.violations[:3]
    assert result.max_ratio > 1 - 5 * ROUNDING_MARGIN
