"""Front-ends: a fixed per-example map before the input clip, cached features, raw-input saved models."""

import os

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import cli, config, data, sensitivity, training, verification
from lipdp import layers as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def images(n=12, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, size, size, channels)).astype("float32")


def scattering_model(frontend, classes=4, size=16, channels=1):
    model = lipdp.DPSequential(
        [
            tf.keras.Input((size, size, channels)),
            frontend,
            L.InputNormClip(1.0),
            L.Flatten(),
            L.LipschitzDense(8, bias_bound=0.5),
            L.GroupSort(),
            L.LipschitzDense(classes),
            L.ClipGradient(0.1),
        ]
    )
    model.compile("adam", loss=lipdp.losses.TauCategoricalCrossentropy(16.0))
    return model


@pytest.mark.parametrize("channels", [1, 3])
def test_scattering_shape_channels_and_per_example(channels):
    layer = L.Scattering2D(J=2, L=4)
    x = images(channels=channels)
    out = layer(x).numpy()
    assert layer.scattering_channels() == 1 + 4 * 2 + 16  # 1 + L J + L^2 J (J - 1) / 2
    assert out.shape == (len(x), 4, 4, channels * 25)
    assert not layer.trainable_weights
    np.testing.assert_allclose(layer(x[3:4]).numpy()[0], out[3], rtol=1e-5, atol=1e-6)  # batch-independent


@pytest.mark.parametrize("normalize", [None, "group"])
def test_flip_invariant_scattering_averages_the_image_and_its_mirror_image(normalize):
    x, groups = images(channels=3, seed=4), 3 if normalize else 1
    mirrored = x[:, :, ::-1, :]
    plain = L.Scattering2D(J=2, L=4)
    expected = 0.5 * (plain(x).numpy() + plain(mirrored).numpy())
    if normalize:
        expected = group_normalised(expected, groups)
    layer = L.Scattering2D(J=2, L=4, normalize=normalize, groups=groups, flip_invariant=True)
    out = layer(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer(mirrored).numpy(), out, rtol=1e-4, atol=1e-5)  # invariant to the mirror
    assert np.abs(out - plain(x).numpy()).max() > 1e-2  # not the plain transform (images are not symmetric)
    restored = L.Scattering2D.from_config(layer.get_config())
    assert restored.flip_invariant is True
    with pytest.raises(ValueError, match="flip_invariant must be true or false"):
        L.Scattering2D(flip_invariant="yes")


def group_normalised(features, groups):
    """Each example's channels in ``groups`` groups, each centred and scaled over its positions and channels."""
    n, height, width, channels = features.shape
    grouped = features.reshape(n, height, width, groups, channels // groups).astype(np.float64)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    return ((grouped - mean) / np.sqrt(grouped.var(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(features.shape)


def test_group_normalisation_is_per_example_and_per_group():
    x = images()
    expected = group_normalised(L.Scattering2D(J=2, L=4)(x).numpy(), 5)
    out = L.Scattering2D(J=2, L=4, normalize="group", groups=5)(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out.reshape(12, 4, 4, 5, 5).mean(axis=(1, 2, 4)), 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by groups"):
        L.Scattering2D(J=2, L=4, normalize="group", groups=7)(images())


def test_bounds_hold_behind_a_front_end():
    """The bounds start at the clip's output: checked against true per-sample gradients, before and after fit."""
    tf.keras.utils.set_random_seed(0)
    model = scattering_model(L.Scattering2D(J=2, L=4, normalize="group", groups=5))
    x, rng = images(n=32), np.random.default_rng(1)
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 32)]
    result = verification.verify_bounds(model, x, y, rtol=0)
    assert not result.violations and result.max_ratio > 0.1
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=8)
    model.make_private(sampler, noise_multiplier=1.0)
    model.fit(sampler, epochs=2, verbose=0)
    assert not verification.verify_bounds(model, x * 50, y, rtol=0).violations


def test_a_front_end_must_precede_the_clip_and_be_fixed():
    with pytest.raises(lipdp.errors.ModelNotSupportedError, match="front-end"):
        model = lipdp.DPSequential(
            [
                tf.keras.Input((16, 16, 1)),
                L.InputNormClip(1.0),
                L.Scattering2D(J=2, L=4),
                L.Flatten(),
                L.LipschitzDense(3),
            ]
        )
        model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy())
        sensitivity.validate(model)


def test_saved_model_takes_raw_inputs(tmp_path):
    model = scattering_model(L.Scattering2D(J=2, L=4))
    x = images()
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.layers[0], L.Scattering2D)


def test_cached_features_are_keyed_by_data_and_settings(tmp_path, monkeypatch):
    layer, x = L.Scattering2D(J=2, L=4), images()
    first = L.cached_features(layer, x, str(tmp_path), batch_size=5)
    np.testing.assert_allclose(first, layer(x).numpy(), rtol=1e-6)
    assert len(os.listdir(tmp_path)) == 1
    monkeypatch.setattr(layer, "call", lambda *a, **k: pytest.fail("recomputed a cached feature"))
    np.testing.assert_array_equal(L.cached_features(layer, x, str(tmp_path)), first)
    monkeypatch.undo()
    other = x.copy()
    other[0, 0, 0, 0] += 0.5  # one value changed: a new key
    L.cached_features(layer, other, str(tmp_path))
    L.cached_features(L.Scattering2D(J=2, L=4, normalize="group", groups=5), x, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3


def train_digits(out, overrides):
    """``lipdp train configs/digits.yaml`` into ``out`` with ``--set`` overrides; it must succeed."""
    assert (
        cli.main(["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in overrides for a in ("--set", s)]) == 0
    )


def test_training_run_with_a_front_end_saves_a_raw_input_model(tmp_path):
    """lipdp train on cached features; model.keras holds the front-end and takes raw images."""
    out = str(tmp_path / "run")
    overrides = [
        "model.frontend={type: Scattering2D, J: 1, L: 4, normalize: group, groups: 5}",
        "model.input_norm=1.0",
        "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 10}]",
        "training.epochs=2",
        f"dataset.feature_cache={tmp_path / 'cache'}",
    ]
    train_digits(out, overrides)
    assert os.listdir(tmp_path / "cache")
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    assert isinstance(model.layers[0], L.Scattering2D) and model.input_shape == (None, 8, 8, 1)
    digits = data.load("digits")
    assert model.evaluate(digits.x_test, digits.y_test, verbose=0)[1] > 0.3
    assert int(model.privacy_steps) == 2 * model.privacy.steps_per_epoch
    assert "reads the model input" not in sensitivity.report(model)


def test_frontend_config_must_name_a_front_end():
    with pytest.raises(config.ConfigError, match="not a lipdp front-end"):
        config.load(DIGITS, ["model.frontend={type: Flatten}"])  # at load, before any data is read


def test_assembling_a_front_end_keeps_an_unaccountable_head_unaccountable():
    head = lipdp.DPSequential([tf.keras.Input((4, 4, 25)), L.InputNormClip(1.0), L.Flatten(), L.LipschitzDense(3)])
    head.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy())
    features = np.random.default_rng(0).random((12, 4, 4, 25)).astype("float32")
    head.make_private(
        lipdp.PoissonSampler(features, np.eye(3, dtype="float32")[np.arange(12) % 3], expected_batch_size=4),
        noise_multiplier=1.0,
    )
    head.allow_unaccounted_steps()
    model = training.with_frontend(head, [L.Scattering2D(J=2, L=4)], (16, 16, 1))
    with pytest.raises(lipdp.errors.NotPrivateError, match="unaccountable"):
        model.epsilon()


@pytest.mark.parametrize("shape", [(8, 12, 2), (12, 8, 1), (9, 13, 1)])
def test_flip_invariance_is_exact_along_the_width_of_any_image_shape(shape):
    """The mirror is left-right (the width, axis 2 of channels-last inputs), whatever H, W and the channels."""
    x = np.random.default_rng(5).random((3, *shape)).astype("float32")
    layer, plain = L.Scattering2D(J=2, L=4, flip_invariant=True), L.Scattering2D(J=2, L=4)
    out = layer(x).numpy()
    np.testing.assert_array_equal(layer(x[:, :, ::-1]).numpy(), out)  # exact: the same two terms, swapped
    assert np.abs(layer(x[:, ::-1]).numpy() - out).max() > 1e-2  # not the up-down mirror
    np.testing.assert_allclose(out, 0.5 * (plain(x).numpy() + plain(x[:, :, ::-1]).numpy()), rtol=1e-5, atol=1e-6)


def test_flip_invariant_and_plain_features_never_share_a_cache_entry(tmp_path):
    x = images(channels=2)
    plain, flip = L.Scattering2D(J=2, L=4), L.Scattering2D(J=2, L=4, flip_invariant=True)
    for first, second in ((plain, flip), (flip, plain)):
        cache = str(tmp_path / first.name)
        L.cached_features(first, x, cache)
        np.testing.assert_allclose(L.cached_features(second, x, cache), second(x).numpy(), rtol=1e-6)
        assert len(os.listdir(cache)) == 2
    restored = L.Scattering2D.from_config(flip.get_config())  # a saved model's front-end reads the same entry
    L.cached_features(restored, x, str(tmp_path / flip.name))
    assert len(os.listdir(tmp_path / flip.name)) == 2


def test_a_flip_invariant_run_saves_a_model_that_certify_reads(tmp_path, capsys):
    """lipdp train with the flip-invariant front-end, then lipdp certify: the saved model holds the averaged map
    (invariant to the mirror), its certificate uses the front-end's bound."""
    from lipdp import robustness

    out = str(tmp_path / "run")
    overrides = [
        "model.frontend={type: Scattering2D, J: 1, L: 4, flip_invariant: true}",
        "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 10}]",
        "training.epochs=1",
        f"dataset.feature_cache={tmp_path / 'cache'}",
    ]
    train_digits(out, overrides)
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    frontend = model.layers[0]
    assert isinstance(frontend, L.Scattering2D) and frontend.flip_invariant is True
    x = data.load("digits").x_test[:16]
    np.testing.assert_allclose(model.predict(x[:, :, ::-1], verbose=0), model.predict(x, verbose=0), atol=1e-6)
    bound = float(_built_bound(x.shape[1:]))
    assert robustness.lipschitz_constant(model) >= bound > 1.0
    capsys.readouterr()
    assert cli.main(["certify", out, "--radii", "0", "0.01"]) == 0
    assert "not certified" not in capsys.readouterr().out


def _built_bound(input_shape):
    layer = L.Scattering2D(J=1, L=4, flip_invariant=True)
    layer.build((None, *input_shape))
    return layer.lipschitz_constant()
