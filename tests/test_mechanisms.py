"""The gradient mechanism protocol (lipdp/mechanisms.py): how a model gets its mechanism, and noise allocation."""

import math

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import config, mechanisms
from lipdp import layers as L
from lipdp.augmentation import AugmentationMultiplicity
from lipdp.clipping import AutomaticClipping, FlatClipping, GlobalClipping, rule_names
from lipdp.errors import ModelNotSupportedError, NotPrivateError
from lipdp.sensitivity import CertifiedBounds


def test_get_takes_none_a_name_a_config_or_a_mechanism():
    assert isinstance(mechanisms.get(None), CertifiedBounds)
    assert isinstance(mechanisms.get("certified"), CertifiedBounds)
    flat = mechanisms.get({"name": "flat", "clip_norm": 0.25})
    assert isinstance(flat, FlatClipping) and flat.clip_norm == 0.25 and flat.sensitivity() == 0.25
    given = AutomaticClipping(gamma=0.1)
    assert mechanisms.get(given) is given
    assert mechanisms.get(flat.get_config()).get_config() == flat.get_config()


def test_every_clipping_rule_is_registered_once():
    assert set(rule_names()) == {"flat", "automatic", "global"}
    assert set(mechanisms.registered()) == {"certified", *rule_names()}
    assert mechanisms.registered()["global"] is GlobalClipping


@pytest.mark.parametrize(
    "identifier, message",
    [
        ("flatt", r"unknown gradient mechanism 'flatt' \(did you mean 'flat'\?\)"),
        ({"clip_norm": 1.0}, "unknown gradient mechanism None"),
        ({"name": "flat", "clip_nrom": 1.0}, "'flat' takes clip_norm, gamma; unknown: clip_nrom"),
        ({"name": "certified", "clip_norm": 1.0}, "'certified' takes augmentation; unknown: clip_norm"),
        (3, "expected a name, a config dict or a lipdp.mechanisms.GradientMechanism"),
    ],
)
def test_bad_identifiers_are_refused_by_name(identifier, message):
    with pytest.raises(ModelNotSupportedError, match=message):
        mechanisms.get(identifier)


def test_config_mechanisms_take_a_name_and_refuse_non_numbers():
    assert config.build_mechanism("flat").get_config() == mechanisms.get("flat").get_config()
    for spec, message in [
        ({"name": "flat", "clip_norm": True}, "clip_norm must be a positive finite number, got True"),
        ({"name": "automatic", "gamma": "0.1"}, "gamma must be a positive finite number, got '0.1'"),
        (3, "model.mechanism: expected null, a name or"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.build_mechanism(spec)


def test_the_model_takes_its_mechanism_and_saves_it():
    layers = [tf.keras.Input((3,)), tf.keras.layers.Dense(2)]
    model = lipdp.DPSequential(layers, mechanism={"name": "global", "clip_norm": 2.0})
    assert model.mechanism.get_config() == {"name": "global", "clip_norm": 2.0, "gamma": 0.01}
    assert lipdp.DPSequential.from_config(model.get_config()).mechanism.get_config() == model.mechanism.get_config()
    with pytest.raises(TypeError, match="clipping"):
        lipdp.DPSequential(layers, clipping="flat")  # the one way is mechanism=


def test_noise_allocation():
    per_variable = mechanisms.Sensitivity.of_variables([tf.constant(3.0, tf.float64), tf.constant(4.0, tf.float64)])
    assert float(per_variable.total) == 5.0
    assert [float(s) for s in per_variable.noise_stddevs(2.0, "global", 2)] == [10.0, 10.0]
    per_layer = [float(s) for s in per_variable.noise_stddevs(2.0, "per-layer", 2)]
    assert per_layer == pytest.approx([2.0 * math.sqrt(2) * 3.0, 2.0 * math.sqrt(2) * 4.0])
    # k Gaussian mechanisms of multipliers sigma sqrt(k) compose into one of multiplier sigma
    assert sum((c / s) ** 2 for c, s in zip((3.0, 4.0), per_layer)) == pytest.approx(1 / 2.0**2)
    whole = mechanisms.Sensitivity.of_whole_contribution(0.5)
    assert [float(s) for s in whole.noise_stddevs(2.0, "per-layer", 3)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="noise_allocation"):
        whole.noise_stddevs(1.0, "per-variable", 1)


def _trained(mechanism, tmp_path=None):
    x = np.random.default_rng(0).normal(size=(60, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(60) % 2]
    model = lipdp.DPSequential(
        [tf.keras.Input((4,)), L.InputNormClip(1.0), L.LipschitzDense(2)], mechanism=mechanism, noise_seed=0
    )
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=20, seed=0)
    model.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    model.fit(sampler, epochs=1, verbose=0)
    return model, sampler


def test_a_statement_is_refused_for_steps_another_mechanism_took():
    """Swapping the mechanism after fit (or reviving weights under another one) must not restate their steps."""
    model, _ = _trained({"name": "flat", "clip_norm": 0.5})
    assert "flat per-example clipping" in model.privacy_statement()
    model.mechanism = mechanisms.get("certified")
    with pytest.raises(NotPrivateError, match="another privacy policy or mechanism than the model states"):
        model.privacy_statement()
    model.mechanism = mechanisms.get({"name": "flat", "clip_norm": 0.5})
    assert model.privacy_state()["steps"] == model.steps_taken


def test_an_augmented_model_states_and_resumes_after_save_and_load(tmp_path):
    """The augmentation layers' build_config (present once they ran) stays out of the privacy record."""
    mechanism = CertifiedBounds(augmentation=AugmentationMultiplicity(2, [tf.keras.layers.GaussianNoise(0.1)]))
    model, sampler = _trained(mechanism)
    state = model.privacy_state()
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert loaded.privacy_state()["epsilon"] == pytest.approx(state["epsilon"])
    loaded.make_private(sampler, noise_multiplier=1.0, delta=1e-3)
    loaded.fit(sampler, epochs=1, verbose=0)
    assert loaded.steps_taken == 2 * sampler.steps_per_epoch
