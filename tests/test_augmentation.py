"""Augmentation multiplicity: K views per example, losses averaged; bounds against true per-example gradients."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import augmentation, config, sensitivity, training
from lipdp import layers as L
from lipdp.augmentation import AugmentationMultiplicity
from lipdp.errors import ConfigError, ModelNotSupportedError

INPUT_NORM, CLASSES, CLIP = 2.0, 5, 0.05


def linear_model(views, clip=CLIP, layers=()):
    """Input clip, one dense layer, a logit clip: per view the kernel gradient is x (x) z with ||z|| <= clip."""
    tf.keras.utils.set_random_seed(0)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((8,)),
            L.InputNormClip(INPUT_NORM),
            L.LipschitzDense(CLASSES, bias_bound=1.0),
            L.ClipGradient(clip),
        ],
        mechanism=sensitivity.CertifiedBounds(augmentation=AugmentationMultiplicity(views, layers)),
    )
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(32.0))
    return model


def adversarial_batch(model, n=12, seed=0):
    """Inputs at the norm bound, labelled with the class the model likes least (saturated cross-entropy)."""
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype("float32")
    x *= INPUT_NORM / np.linalg.norm(x, axis=1, keepdims=True)
    y = tf.one_hot(np.argmin(model(x).numpy(), axis=1), CLASSES).numpy()
    return x, y


def true_per_example_gradients(model, x, y, views):
    """Each example alone: the gradient of the mean of its ``views`` (identical) views' losses."""
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            xi = tf.repeat(x[i : i + 1], views, axis=0)
            loss = tf.reduce_mean(model.loss.call(tf.repeat(y[i : i + 1], views, axis=0), model(xi, training=True)))
        grads.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    return grads


@pytest.mark.parametrize("views", [1, 4])
def test_bounds_hold_for_true_per_example_gradients_and_are_attained(views):
    model = linear_model(views)
    x, y = adversarial_batch(model)
    bounds = np.array([float(b) for b in sensitivity.gradient_bound_tensors(model, views=views)])
    per_example = true_per_example_gradients(model, x, y, views)
    norms = np.array([[np.linalg.norm(g) for g in example] for example in per_example])
    assert np.all(norms <= bounds)
    assert norms[:, 0].max() > 0.99 * bounds[0]  # the kernel bound is attained: views * ||x|| * clip
    if views > 1:  # the single-view bound would be exceeded: every view's cotangent reaches the clip
        single = np.array([float(b) for b in sensitivity.gradient_bound_tensors(model)])
        assert norms[:, 0].max() > 1.5 * single[0]


def test_gradient_sums_are_the_sums_of_the_per_example_averages():
    views = 3
    model = linear_model(views)
    x, y = adversarial_batch(model)
    result = model.mechanism.gradient_sums(model, tf.constant(x), tf.constant(y))
    expected = [sum(parts) for parts in zip(*true_per_example_gradients(model, x, y, views))]
    for total, want in zip(result.sums, expected):
        np.testing.assert_allclose(total.numpy(), want, rtol=1e-4, atol=1e-6)
    assert result.per_sample_loss.shape == (len(x),) and result.y_pred.shape == (len(x), CLASSES)
    bounds = [float(b) for b in result.sensitivity.per_variable]
    np.testing.assert_allclose(bounds, [float(b) for b in sensitivity.gradient_bound_tensors(model, views=views)])


def test_without_logit_clipping_the_bound_is_the_single_view_bound():
    model = linear_model(4, clip=1e6)
    many = [float(b) for b in sensitivity.gradient_bound_tensors(model, views=4)]
    one = [float(b) for b in sensitivity.gradient_bound_tensors(model)]
    np.testing.assert_allclose(many, one, rtol=1e-6)


def images(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1)).astype("float32"), tf.one_hot(rng.integers(0, 3, n), 3).numpy()


def conv_model(views=2):
    layers = [tf.keras.layers.RandomFlip("horizontal"), tf.keras.layers.RandomTranslation(0.2, 0.2)]
    model = lipdp.DPSequential(
        [
            tf.keras.Input((8, 8, 1)),
            L.InputNormClip(1.0),
            L.LipschitzConv2D(4, 3),
            L.GroupSort(),
            L.Flatten(),
            L.LipschitzDense(3),
        ],
        mechanism=sensitivity.CertifiedBounds(augmentation=AugmentationMultiplicity(views, layers)),
    )
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(8.0), metrics=["accuracy"])
    return model


def test_random_views_differ_and_training_runs_with_empty_batches(tmp_path):
    model = conv_model()
    x, y = images()
    views = tf.repeat(x[:1], 8, axis=0)
    for layer in model.mechanism.augmentation.layers:
        views = layer(views, training=True)
    assert len({views[i].numpy().tobytes() for i in range(8)}) > 1  # the augmentation is random
    sampler = lipdp.PoissonSampler(x, y, sampling_rate=0.05)  # empty batches are frequent
    model.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    model.fit(sampler, epochs=2, verbose=0)
    assert model.steps_taken == 2 * sampler.steps_per_epoch
    assert "2 augmented views per example" in model.privacy_statement()
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert loaded.mechanism.views == 2
    assert [type(layer).__name__ for layer in loaded.mechanism.augmentation.layers] == [
        "RandomFlip",
        "RandomTranslation",
    ]


def test_refusals():
    with pytest.raises(ModelNotSupportedError, match="'flat' takes clip_norm, gamma; unknown: augmentation"):
        lipdp.DPSequential(
            [tf.keras.Input((3,)), L.InputNormClip(1.0)],
            mechanism={"name": "flat", "augmentation": AugmentationMultiplicity(2)},
        )
    with pytest.raises(ValueError, match="positive integer"):
        AugmentationMultiplicity(0)
    model = lipdp.DPSequential(
        [tf.keras.Input((8,)), L.InputNormClip(1.0), L.LipschitzDense(3), L.AdaptiveClipGradient(0.1)],
        mechanism=sensitivity.CertifiedBounds(augmentation=AugmentationMultiplicity(2)),
    )
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    x, y = images()
    sampler = lipdp.PoissonSampler(x.reshape(len(x), -1)[:, :8], y, expected_batch_size=10)
    with pytest.raises(ModelNotSupportedError, match="sensitivity K, not 1"):
        model.make_private(sampler, noise_multiplier=1.0, quantile_noise_share=0.1)


def test_config_spec():
    spec = {"multiplicity": 3, "layers": [{"type": "RandomFlip", "mode": "horizontal"}]}
    built = augmentation.from_spec(spec)
    assert built.multiplicity == 3 and type(built.layers[0]).__name__ == "RandomFlip"
    assert augmentation.from_spec(None) is None
    with pytest.raises(ConfigError, match="'Dropout' is not one of RandomFlip"):
        augmentation.from_spec({"multiplicity": 2, "layers": [{"type": "Dropout", "rate": 0.5}]})
    with pytest.raises(ConfigError, match="unknown key"):
        augmentation.from_spec({"multiplicty": 2})
    with pytest.raises(ConfigError, match="RandomFlip"):
        augmentation.from_spec({"multiplicity": 2, "layers": [{"type": "RandomFlip", "mood": "horizontal"}]})
    cfg = config.from_dict(
        {
            "model": {
                "mechanism": {"name": "certified", "augmentation": spec},
                "layers": [{"type": "Flatten"}, {"type": "LipschitzDense", "units": 10}],
            },
            "privacy": {"target_epsilon": 1.0},
        }
    )
    model = training.build_model(cfg, (8, 8, 1))
    assert model.mechanism.views == 3
    with pytest.raises(ConfigError, match="model.mechanism: gradient mechanism 'flat' takes .* unknown: augmentation"):
        config.from_dict(
            {"model": {"mechanism": {"name": "flat", "augmentation": spec}}, "privacy": {"target_epsilon": 1.0}}
        )


def test_the_bound_report_shows_the_per_example_bounds_used():
    model = linear_model(4)
    text = sensitivity.report(model)
    bounds = sensitivity.gradient_bound_tensors(model, views=4)
    total = float(tf.norm(tf.stack(bounds)))
    assert "4 augmented views per example" in text
    assert f"global sensitivity (l2 norm of all variable bounds): {total:.6g}" in text
    assert sensitivity.format_bound(bounds[0]) in text  # the kernel row: an example's bound, not a view's
