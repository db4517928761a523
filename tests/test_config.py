"""Config schema: typos and wrong types are errors naming the key."""

import glob
import os

import pytest
import yaml

from lipdp import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_are_valid(path):
    cfg = config.load(path)
    assert cfg.model.layers and cfg.training.epochs > 0


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(
        config.ConfigError, match=r"privacy.target_epsilonn: unknown key \(did you mean 'target_epsilon'"
    ):
        config.from_dict({"privacy": {"target_epsilonn": 3.0}})


def test_unknown_section():
    with pytest.raises(config.ConfigError, match="trainin: unknown key"):
        config.from_dict({"trainin": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(config.ConfigError, match="training.epochs: expected int"):
        config.from_dict({"training": {"epochs": "ten"}})
    with pytest.raises(config.ConfigError, match="sampling.batch_size: expected int"):
        config.from_dict({"sampling": {"batch_size": True}})


def test_ints_are_accepted_for_floats():
    assert config.from_dict({"privacy": {"target_epsilon": 3}}).privacy.target_epsilon == 3.0


def test_layer_typos_are_reported():
    with pytest.raises(config.ConfigError, match=r"unknown layer type 'GroupSrot' \(did you mean 'GroupSort'"):
        config.from_dict({"model": {"layers": [{"type": "GroupSrot"}]}})
    with pytest.raises(config.ConfigError, match=r"model.layers.0.unitz: unknown key \(did you mean 'units'"):
        config.from_dict({"model": {"layers": [{"type": "LipschitzDense", "unitz": 3}]}})
    with pytest.raises(config.ConfigError, match=r"model.frontend.flip_invariat: unknown key \(did you mean 'flip_"):
        config.from_dict({"model": {"frontend": {"type": "Scattering2D", "flip_invariat": True}}})
    with pytest.raises(config.ConfigError, match=r"model.frontend: unknown layer type 'Scatering2D'"):
        config.from_dict({"model": {"frontend": {"type": "Scatering2D"}}})


def test_overrides_reach_nested_keys_and_list_items(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layers:\n    - {type: LipschitzDense, units: 3}\n")
    cfg = config.load(path, ["model.layers.0.units=7", "privacy.noise_multiplier=1.5", "loss.params.tau=4"])
    assert cfg.model.layers[0]["units"] == 7
    assert cfg.privacy.noise_multiplier == 1.5
    assert cfg.loss.params == {"tau": 4}
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load(path, ["privacy.noise_multiplier"])


INPUT_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_build_a_private_model_that_steps(path):
    import numpy as np

    from lipdp import sampling, training

    cfg = config.load(path)
    shape = INPUT_SHAPES[cfg.dataset.name]
    rng = np.random.default_rng(0)
    n = 4 * cfg.sampling.batch_size
    x = rng.random((n,) + shape, dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    frontend = training.build_frontend(cfg)
    sampler = sampling.make_sampler(cfg.sampling.kind, x, y, batch_size=cfg.sampling.batch_size)
    steps = cfg.training.epochs * sampler.steps_per_epoch  # for a decaying learning rate
    if frontend is None:
        model = training.build_model(cfg, shape, training_steps=steps)
    else:  # as lipdp train assembles it: the head on the features, then the front-end in front of it
        features = tuple(frontend.compute_output_shape((None,) + shape)[1:])
        head = training.build_model(cfg, features, training_steps=steps)
        model = training.with_frontend(head, [frontend], shape)
    policy = model.make_private(
        sampler, target_epsilon=cfg.privacy.target_epsilon, epochs=cfg.training.epochs, delta=0.1 / n
    )
    model.allow_unaccounted_steps().train_on_batch(x[:8], y[:8])
    assert int(model.privacy_steps) == 1 and policy.noise_multiplier > 0


@pytest.mark.parametrize("value", ["1", "'true'", "null", "[true]"])
def test_a_front_end_argument_of_the_wrong_type_is_refused_at_load(value):
    """Before any data is read (a tune checks every drawn configuration so), naming model.frontend."""
    with pytest.raises(config.ConfigError, match="model.frontend: flip_invariant must be true or false"):
        config.from_dict({"model": {"frontend": yaml.safe_load(f"{{type: Scattering2D, flip_invariant: {value}}}")}})
    with pytest.raises(config.ConfigError, match="model.frontend: Flatten is not a lipdp front-end"):
        config.from_dict({"model": {"frontend": {"type": "Flatten"}}})
    valid = {"model": {"frontend": yaml.safe_load("{type: Scattering2D, flip_invariant: yes}")}}
    assert config.from_dict({**valid, "privacy": {"noise_multiplier": 1.0}}).model.frontend["flip_invariant"] is True
