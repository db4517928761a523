"""The gradient mechanism protocol (lipdp/mechanisms.py): how a model gets its mechanism, and noise allocation."""

import math

import pytest
import tensorflow as tf

import lipdp
from lipdp import mechanisms
from lipdp.clipping import AutomaticClipping, FlatClipping, GlobalClipping, rule_names
from lipdp.errors import ModelNotSupportedError
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
