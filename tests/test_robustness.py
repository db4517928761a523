"""Certified l2 robustness (lipdp.robustness): constants against numerical estimates, PGD never beats a
certificate, models that cannot be certified say why, the metric, the run folder and the CLI."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_reports import train_tiny

import lipdp
from lipdp import cli, config, keras, robustness
from lipdp import layers as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def orthogonal_model(hidden=(), inputs=16, classes=10, clip=100.0, seed=0):
    """Orthonormal dense layers with GroupSort between them; the clip is far above the test inputs' norms."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,)), L.InputNormClip(clip)]
    for units in hidden:
        layers += [L.LipschitzDense(units), L.GroupSort()]
    model = keras.Sequential(layers + [L.LipschitzDense(classes)])
    for layer in model.layers:  # Björck-orthonormal weights, as after a training step
        if isinstance(layer, L.LipschitzDense):
            layer.kernel.assign(layer.kernel.constraint(layer.kernel))
    return model


def norms(t):
    """Per-example l2 norms, shaped to broadcast against ``t``."""
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=list(range(1, len(t.shape))), keepdims=True))


def largest_ratio(model, x, steps=40):
    """Power iteration on ``J^T J`` at each input of ``x``: the largest local l2 gain found (<= the constant)."""
    x = tf.convert_to_tensor(x, tf.float32)
    v = tf.random.normal(x.shape)
    for _ in range(steps):
        v = v / norms(v)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.autodiff.ForwardAccumulator(x, v) as forward:
                y = model(x)
            jv = forward.jvp(y)
        v = outer.gradient(y, x, output_gradients=jv)  # J^T J v, per example
    return float(tf.reduce_max(norms(jv)))


def pair_ratio(model, x, scale=1e-2, seed=0):
    """``max ||f(x) - f(x')|| / ||x - x'||`` over random nearby pairs."""
    delta = tf.constant(np.random.default_rng(seed).normal(size=x.shape) * scale, tf.float32)
    return float(tf.reduce_max(norms(model(x + delta) - model(x))[:, 0] / norms(delta)[:, 0]))


def test_orthogonal_chain_constant_is_tight_and_an_upper_bound():
    x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    linear = orthogonal_model()
    constant = robustness.lipschitz_constant(linear)
    assert 1.0 <= constant <= 1.001  # one orthonormal kernel, the clip, the rounding allowance
    assert 0.999 <= largest_ratio(linear, x) <= constant  # a linear map: its spectral norm is reached
    deep = orthogonal_model(hidden=(32, 32))
    deep_constant = robustness.lipschitz_constant(deep)
    assert 1.0 <= deep_constant <= 1.001
    assert 0.5 < largest_ratio(deep, x) <= deep_constant
    assert pair_ratio(deep, x) <= deep_constant


def test_scaled_kernels_and_convolutions_multiply_along_the_chain():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.InputNormClip(100.0),
            L.LipschitzConv2D(4, 3, padding="same", lipschitz_target=1.0),
            L.L2NormPooling2D(2),
            L.Flatten(),
            L.LipschitzDense(10, lipschitz_target=1.0),
        ]
    )
    conv, dense = model.layers[1], model.layers[4]
    conv.kernel.assign(conv.kernel * 3.0)
    expected = float(conv.lipschitz_constant()) * float(model.layers[2].lipschitz_constant())
    expected *= float(dense.lipschitz_constant())
    constant = robustness.lipschitz_constant(model)
    assert expected <= constant <= expected * 1.001
    x = np.random.default_rng(2).normal(size=(6, 8, 8, 2)).astype(np.float32)
    assert largest_ratio(model, x) <= constant and pair_ratio(model, x) <= constant


def test_residual_add_sums_its_branches():
    inputs = keras.Input((6,))
    clipped = L.InputNormClip(100.0)(inputs)
    branch = L.LipschitzDense(6, kernel_initializer="identity")(clipped)
    outputs = L.Add()([clipped, branch])  # x + I x = 2 x
    model = keras.Model(inputs, outputs)
    assert 2.0 <= robustness.lipschitz_constant(model) <= 2.001
    x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    assert largest_ratio(model, x) == pytest.approx(2.0, rel=1e-4)
    averaged = keras.Model(inputs, L.Average()([clipped, branch]))
    assert 1.0 <= robustness.lipschitz_constant(averaged) <= 1.001


def pgd_margin(model, x, labels, radii, steps=40):
    """l2 PGD within ``radii`` (per example) maximising the best other logit minus the label's; the final margins."""
    x = tf.convert_to_tensor(x, tf.float32)
    radii = tf.constant(radii, tf.float32)[:, None]
    delta = tf.random.normal(x.shape, seed=0) * 1e-3
    one_hot = tf.one_hot(labels, 10)

    def margins(d):
        logits = model(x + d)
        own = tf.reduce_sum(logits * one_hot, axis=1)
        return own - tf.reduce_max(logits - 1e9 * one_hot, axis=1)

    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            loss = -tf.reduce_sum(margins(delta))
        grad = tape.gradient(loss, delta)
        delta = delta + 0.1 * radii * grad / (tf.norm(grad, axis=1, keepdims=True) + 1e-12)
        delta = delta * tf.minimum(1.0, radii / (tf.norm(delta, axis=1, keepdims=True) + 1e-12))
    return margins(delta).numpy()


def certified_examples(model, x, labels):
    logits = model.predict(x, verbose=0)
    radii = robustness.certified_radii(logits, labels, robustness.lipschitz_constant(model))
    keep = radii > 0
    return x[keep], labels[keep], radii[keep]


def assert_pgd_never_beats_the_certificate(model, x, labels, scale_found):
    x, labels, radii = certified_examples(model, x, labels)
    assert len(x) >= 5
    assert np.all(pgd_margin(model, x, labels, radii * 0.999) > 0)  # inside the certified ball: never flipped
    # The attack is strong enough to matter: a little beyond the certificate it flips examples.
    assert np.mean(pgd_margin(model, x, labels, radii * scale_found) <= 0) > 0.5


def test_pgd_never_beats_the_certificate_of_a_random_model():
    model = orthogonal_model()  # linear with orthonormal rows: the certified radius is the exact one
    x = np.random.default_rng(4).normal(size=(64, 16)).astype(np.float32)
    labels = np.argmax(model.predict(x, verbose=0), axis=1)  # every example correct, margins vary
    assert_pgd_never_beats_the_certificate(model, x, labels, scale_found=1.05)


def test_pgd_never_beats_the_certificate_of_a_trained_model():
    data = lipdp.data.load_digits()
    model = orthogonal_model(hidden=(64,), inputs=64, clip=8.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=lipdp.losses.TauCategoricalCrossentropy(16.0))
    model.fit(data.x_train.reshape(-1, 64), data.y_train, epochs=15, batch_size=128, verbose=0)
    x, labels = data.x_test.reshape(-1, 64)[:120], data.y_test[:120].argmax(axis=1)
    assert np.mean(model.predict(x, verbose=0).argmax(axis=1) == labels) > 0.8
    assert_pgd_never_beats_the_certificate(model, x, labels, scale_found=4.0)


def test_certified_accuracy_counts_margins_above_sqrt2_l_r():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9], [1.0, 1.0, 0.0], [0.0, 5.0, 0.0]], np.float32)
    labels = np.array([0, 1, 0, 0])  # margins 2, 0.1, 0 (tie), -5
    radii = robustness.certified_radii(logits, labels, lipschitz=0.5)
    np.testing.assert_allclose(radii, [2 / (np.sqrt(2) * 0.5), 0.1 / (np.sqrt(2) * 0.5), 0, 0], rtol=1e-5)
    assert robustness.fraction_certified(radii, [0.0, 0.5, 2.0, 3.0]) == [0.5, 0.25, 0.25, 0.0]
    model = orthogonal_model()  # the metric holds it weakly
    for same_labels in (np.eye(3)[labels], labels[:, None]):  # one-hot rows, or sparse labels of shape (n, 1)
        np.testing.assert_allclose(robustness.certified_radii(logits, same_labels, lipschitz=0.5), radii)
        metric = robustness.CertifiedAccuracy(0.5, model=model)
        metric.update_state(tf.constant(same_labels), tf.constant(logits))
        assert float(metric.result()) == pytest.approx(0.25)


def test_metric_matches_the_function_and_follows_the_weights():
    model = orthogonal_model()
    model.compile(loss="mse", metrics=[robustness.CertifiedAccuracy(0.1, model=model)])
    x = np.random.default_rng(5).normal(size=(50, 16)).astype(np.float32)
    y = np.eye(10)[np.random.default_rng(6).integers(0, 10, 50)]
    expected = robustness.certified_accuracy(model, x, y, [0.1]).certified_accuracy[0]
    assert model.evaluate(x, y, verbose=0, return_dict=True)["certified_accuracy_0.1"] == pytest.approx(expected)
    model.layers[-1].kernel.assign(model.layers[-1].kernel * 4.0)  # margins and constant x4: same radii
    assert model.evaluate(x, y, verbose=0, return_dict=True)["certified_accuracy_0.1"] == pytest.approx(expected)


def test_a_dp_model_binds_its_metric_and_keeps_it_through_save_and_load(tmp_path):
    model = lipdp.DPSequential([keras.Input((16,)), L.InputNormClip(100.0), L.LipschitzDense(10)])
    model.compile(loss=lipdp.losses.TauCategoricalCrossentropy(8.0), metrics=[robustness.CertifiedAccuracy(0.05)])
    x = np.random.default_rng(7).normal(size=(20, 16)).astype(np.float32)
    y = np.eye(10)[np.arange(20) % 10]
    expected = robustness.certified_accuracy(model, x, y, [0.05]).certified_accuracy[0]
    assert model.evaluate(x, y, verbose=0, return_dict=True)["certified_accuracy_0.05"] == pytest.approx(expected)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.evaluate(x, y, verbose=0, return_dict=True)["certified_accuracy_0.05"] == pytest.approx(expected)


def test_unbound_metric_is_an_error():
    metric = robustness.CertifiedAccuracy(0.1)
    with pytest.raises(Exception, match="no model bound"):  # a NotCertifiedError, wrapped by autograph
        metric.update_state(tf.one_hot([0], 3), tf.constant([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "layer, reason",
    [
        (keras.layers.Dense(10), "'Dense'|\\(Dense\\) states no Lipschitz constant"),
        (keras.layers.BatchNormalization(), "BatchNormalization"),
    ],
)
def test_a_layer_without_a_constant_is_not_certified(layer, reason):
    model = keras.Sequential([keras.Input((16,)), L.InputNormClip(1.0), L.LipschitzDense(10), layer])
    result = robustness.certified_accuracy(model, np.zeros((3, 16), np.float32), np.eye(10)[:3], [0.0, 0.1])
    assert not result.certified and result.certified_accuracy is None and result.lipschitz is None
    assert "states no Lipschitz constant" in result.reason and type(layer).__name__ in result.reason
    with pytest.raises(robustness.NotCertifiedError, match="states no Lipschitz constant"):
        robustness.CertifiedAccuracy(0.1, model=model)


def test_a_group_normalised_scattering_front_end_is_not_certified():
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), L.Scattering2D(J=1, L=2, normalize="group", groups=1), L.InputNormClip(1.0)]
        + [L.Flatten(), L.LipschitzDense(10)]
    )
    certificate = robustness.certify(model)
    assert not certificate.certified and "normalize='group'" in certificate.reason
    assert "not globally Lipschitz" in certificate.reason
    assert "not certified" in robustness.certified_accuracy(model, np.ones((2, 8, 8, 1)), [0, 1], [0.1]).summary()


@pytest.mark.parametrize("max_order, flip_invariant", [(1, False), (2, False), (2, True)])
def test_scattering_bound_is_above_its_measured_gain(max_order, flip_invariant):
    scattering = L.Scattering2D(J=2, L=2, max_order=max_order, flip_invariant=flip_invariant)
    model = keras.Sequential([keras.Input((8, 8, 1)), scattering, L.Flatten()])
    bound = float(scattering.lipschitz_constant())
    assert 1.0 < bound < 5.0  # kymatio's Morlet filter bank is not a tight frame (see scattering_lipschitz_bound)
    x = np.random.default_rng(8).normal(size=(4, 8, 8, 1)).astype(np.float32)
    measured = max(largest_ratio(model, x, steps=10), pair_ratio(model, x, scale=1.0))
    assert 0.1 < measured <= bound
    assert robustness.lipschitz_constant(model) == pytest.approx(bound, rel=1e-3)


def test_scattering_padding_factor_is_the_gain_of_kymatios_padding():
    from lipdp.layers.frontends import _padding_copies

    scattering = L.Scattering2D(J=2, L=2)
    scattering.build((None, 8, 8, 1))
    pad = scattering._scattering.pad
    top, bottom, left, right = pad.pad_size
    copies = _padding_copies(top, bottom, 8) * _padding_copies(left, right, 8)
    x = tf.random.normal((1, 8, 8))
    for _ in range(30):  # power iteration on P^T P (diagonal: the copies of each pixel)
        with tf.GradientTape() as tape:
            tape.watch(x)
            padded = pad(x)
        x = tape.gradient(padded, x, output_gradients=padded)
        x = x / tf.norm(x)
    assert copies == 9  # 4 reflected pixels on each side of an 8-pixel axis: the middle two appear 3 times
    assert float(tf.norm(pad(x))) ** 2 == pytest.approx(copies, rel=1e-3)


def test_channel_standardization_constant_is_the_largest_inverse_scale():
    standardization = L.ChannelStandardization([0.0, 1.0, 2.0], [2.0, 0.25, 1.0], clip_norm=10.0, noise_multiplier=None)
    assert float(standardization.lipschitz_constant()) == pytest.approx(4.0)
    inputs = keras.Input((4, 3))
    clipped = L.InputNormClip(100.0)(L.Flatten()(standardization(inputs)))
    chain = keras.Model(inputs, L.LipschitzDense(12, kernel_initializer="identity")(clipped))
    assert 4.0 <= robustness.lipschitz_constant(chain) <= 4.002
    x = np.random.default_rng(9).uniform(size=(5, 4, 3)).astype(np.float32)  # inside the clip ball
    assert largest_ratio(chain, x) == pytest.approx(4.0, rel=1e-4)


def test_config_radii_default_to_fractions_of_the_input_norm_and_refuse_negatives():
    cfg = config.load(DIGITS)
    assert config.certified_radii(cfg) == [f * cfg.model.input_norm for f in robustness.DEFAULT_RADIUS_FRACTIONS]
    assert config.certified_radii(config.load(DIGITS, ["evaluation.certified_radii=[0.5, 1]"])) == [0.5, 1.0]
    with pytest.raises(lipdp.errors.ConfigError, match="evaluation.certified_radii.1"):
        config.load(DIGITS, ["evaluation.certified_radii=[0.5, -1]"])


def test_train_writes_certified_accuracy_and_certify_prints_it(tmp_path, capsys):
    out = train_tiny(str(tmp_path / "run"), "evaluation.certified_radii=[0, 0.01, 0.1]")
    certified = json.load(open(os.path.join(out, "metrics.json")))["certified"]
    assert certified["radii"] == [0.0, 0.01, 0.1] and certified["lipschitz"] >= 1.0
    fractions = certified["certified_accuracy"]
    assert fractions[0] <= certified["accuracy"] and fractions == sorted(fractions, reverse=True)
    history = open(os.path.join(out, "history.csv")).readline()
    assert "val_certified_accuracy_0.01" in history
    capsys.readouterr()
    assert cli.main(["certify", out, "--radii", "0.01", "100"]) == 0
    printed = capsys.readouterr().out
    assert f"r=0.01: {fractions[1]:.4f}" in printed and "r=100: 0.0000" in printed
