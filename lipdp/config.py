"""Experiment configs: YAML files validated against a typed schema.

A config has the sections ``dataset``, ``model``, ``loss``, ``privacy``,
``sampling``, ``optimizer``, ``training`` and ``evaluation`` (see ``configs/digits.yaml``).
Unknown keys and wrong types are errors that name the key (with a
suggestion for typos); nothing is silently ignored. ``--set a.b=value``
overrides are parsed as YAML scalars and validated the same way.
"""

import dataclasses
import difflib
import inspect
import math
import typing
from typing import Any, Dict, List, Optional

import yaml

from lipdp.backend import keras
from lipdp.errors import ConfigError


@dataclasses.dataclass
class DatasetConfig:
    name: str = "digits"
    data_dir: Optional[str] = None
    feature_cache: Optional[str] = "~/.cache/lipdp/features"  # front-end features, keyed by data and settings
    validation_fraction: Optional[float] = None  # tune on the last fraction of the training split (test unused)


@dataclasses.dataclass
class ModelConfig:
    input_norm: float = 8.0
    frontend: Optional[Dict[str, Any]] = None  # a fixed per-example map before the input clip, e.g. Scattering2D
    # {noise_multiplier: z, clip_norm: R, scale: false}: centre the head's inputs per channel by a DP release of
    # the training data's channel means (lipdp.statistics), composed into the accounting
    feature_statistics: Optional[Dict[str, Any]] = None
    layers: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    # how a step gets its gradient sum (lipdp.mechanisms): null = {name: certified} (clipless; with
    # augmentation: {multiplicity: K, layers: [{type: RandomFlip, ...}]}), or a clipping rule such as
    # {name: flat, clip_norm: 1.0}
    mechanism: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class LossConfig:
    type: str = "TauCategoricalCrossentropy"
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PrivacyConfig:
    target_epsilon: Optional[float] = None
    noise_multiplier: Optional[float] = None
    delta: Optional[float] = None
    accountant: str = "rdp"
    noise_allocation: str = "global"
    epsilon_budget: Optional[float] = None
    quantile_noise_share: Optional[float] = None  # privacy share of an AdaptiveClipGradient's threshold releases


@dataclasses.dataclass
class SamplingConfig:
    kind: str = "poisson"
    batch_size: int = 128
    seed: Optional[int] = None  # secret or None: a published seed reveals the batches


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 1e-3
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the Keras optimizer's others, e.g. momentum
    decay: Optional[str] = None  # "cosine": the learning rate falls to 0 along a half cosine over the planned steps
    # Exponential moving average of the weights, swapped in when fit ends: post-processing of the private
    # iterates (no privacy cost); the bounds of every step use the weights in use, never the average.
    ema_momentum: Optional[float] = None


@dataclasses.dataclass
class TrainingConfig:
    epochs: int = 10
    seed: int = 0  # initial weights only (public); the DP noise never uses it
    microbatch_size: Optional[int] = None  # accumulate each Poisson step over micro-batches (flat memory)
    strategy: str = "none"  # none | mirrored (devices of one machine) | multi_worker (machines, from TF_CONFIG)
    logical_cpus: Optional[int] = None  # split the CPU into this many devices first (mirrored on a CPU-only host)


@dataclasses.dataclass
class EvaluationConfig:
    # l2 radii, in the units of the raw model input, at which metrics.json and the report give the certified
    # accuracy (lipdp.robustness); null: 0, 1/32, 1/16, 1/8 and 1/4 of model.input_norm
    certified_radii: Optional[List[float]] = None


@dataclasses.dataclass
class Config:
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


def _unknown_key(path, key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{path}{key}: unknown key{hint}; known keys: {', '.join(known)}")


def _check_type(path, value, annotation):
    """Validates ``value`` against a type annotation; ints are accepted as floats."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return value
        return _check_type(path, value, next(a for a in options if a is not type(None)))
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{path}: expected a {origin.__name__}, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data, path=""):
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, f"{path}{key}.")
        else:
            values[key] = _check_type(f"{path}{key}", value, hints[key])
    return cls(**values)


def from_dict(data):
    """Validated :class:`Config` from a plain mapping."""
    config = _build(Config, data or {})
    validate_layers(config.model.layers)
    if config.model.frontend is not None:
        frontend_layer(config.model.frontend)
    validate_values(config)
    return config


LEARNING_RATE_DECAYS = (None, "cosine")
# Optimizer arguments that have their own keys (or that lipdp sets itself).
_OWN_OPTIMIZER_KEYS = ("learning_rate", "use_ema", "ema_momentum", "is_legacy_optimizer", "name")


def _check_optimizer_params(optimizer):
    """``optimizer.name`` is a Keras optimizer and ``optimizer.params`` are arguments it takes."""

    # By class, never an instance: creating an optimizer initialises TensorFlow's devices, which must wait for
    # training.logical_cpus and the distribution strategy.
    classes = {
        name.lower(): cls
        for name, cls in vars(keras.optimizers).items()
        if inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer)
    }
    cls = classes.get(optimizer.name.lower())
    if cls is None:
        raise ConfigError(f"optimizer.name: {optimizer.name!r} is not a Keras optimizer (e.g. adam, sgd, rmsprop)")
    accepted = _accepted_arguments(cls) - set(_OWN_OPTIMIZER_KEYS)
    for key in optimizer.params:
        if key in _OWN_OPTIMIZER_KEYS:
            raise ConfigError(f"optimizer.params.{key}: set it with its own key (optimizer.{key})")
        if key not in accepted:
            raise _unknown_key("optimizer.params.", key, sorted(accepted))


#: Optional keys of ``model.feature_statistics``: per-moment clips of the release (``None``: ``clip_norm``'s bound).
STATISTICS_CLIPS = ("mean_clip", "variance_clip")


def _check_feature_statistics(spec):
    """``model.feature_statistics``: the arguments of :func:`lipdp.statistics.release_channel_statistics`."""
    if spec is None:
        return
    known = ("noise_multiplier", "clip_norm", "scale", *STATISTICS_CLIPS)
    for key in spec:
        if key not in known:
            raise _unknown_key("model.feature_statistics.", key, list(known))
    for key in ("noise_multiplier", "clip_norm", *STATISTICS_CLIPS):
        value = spec.get(key)
        if key in STATISTICS_CLIPS and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"model.feature_statistics.{key}: a finite number > 0 is required, got {value!r}")
    if not isinstance(spec.get("scale", False), bool):
        raise ConfigError(f"model.feature_statistics.scale: expected true or false, got {spec['scale']!r}")
    if spec.get("variance_clip") is not None and not spec.get("scale", False):
        raise ConfigError("model.feature_statistics.variance_clip: clips the variance release, set scale: true")


def build_mechanism(spec):
    """The :class:`lipdp.mechanisms.GradientMechanism` of ``model.mechanism`` (``None``: clipless)."""
    from lipdp import augmentation, mechanisms
    from lipdp.errors import LipdpError

    if isinstance(spec, str):
        spec = {"name": spec}
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError(f"model.mechanism: expected null, a name or {{name: ..., ...}}, got {spec!r}")
    spec = dict(spec or {"name": "certified"})
    try:
        if spec.get("augmentation") is not None:
            spec["augmentation"] = augmentation.from_spec(spec["augmentation"])
        return mechanisms.from_config(spec)
    except ConfigError:
        raise
    except (LipdpError, TypeError, ValueError) as error:
        raise ConfigError(f"model.mechanism: {error}") from error


def _check_choice(path, value, choices):
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


def _check_positive(path, value):
    if value is not None and not value > 0:
        raise ConfigError(f"{path}: must be > 0, got {value!r}")


def _check_radii(radii):
    """``evaluation.certified_radii``: finite numbers >= 0."""
    for index, radius in enumerate(radii or ()):
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius < math.inf:
            raise ConfigError(f"evaluation.certified_radii.{index}: a finite number >= 0 is required, got {radius!r}")


def certified_radii(config):
    """The radii of ``evaluation.certified_radii``, or the defaults scaled to ``model.input_norm``."""
    from lipdp import robustness

    radii = config.evaluation.certified_radii
    return [float(r) for r in radii] if radii is not None else robustness.default_radii(config.model.input_norm)


def validate_values(config):
    """Checks choices, ranges and the either/or rules before any data is loaded."""
    from lipdp import accounting, distribute, losses, policy

    build_mechanism(config.model.mechanism)
    _check_choice("training.strategy", config.training.strategy, distribute.STRATEGIES)
    _check_feature_statistics(config.model.feature_statistics)
    _check_choice("optimizer.decay", config.optimizer.decay, LEARNING_RATE_DECAYS)
    _check_optimizer_params(config.optimizer)
    _check_choice("sampling.kind", config.sampling.kind, accounting.SAMPLINGS)
    _check_choice("privacy.accountant", config.privacy.accountant, accounting.ACCOUNTANTS)
    _check_choice("privacy.noise_allocation", config.privacy.noise_allocation, policy.NOISE_ALLOCATIONS)
    for path, value in (
        ("model.input_norm", config.model.input_norm),
        ("sampling.batch_size", config.sampling.batch_size),
        ("training.epochs", config.training.epochs),
        ("training.logical_cpus", config.training.logical_cpus),
        ("optimizer.learning_rate", config.optimizer.learning_rate),
        ("privacy.target_epsilon", config.privacy.target_epsilon),
        ("privacy.noise_multiplier", config.privacy.noise_multiplier),
        ("privacy.epsilon_budget", config.privacy.epsilon_budget),
    ):
        _check_positive(path, value)
    _check_radii(config.evaluation.certified_radii)
    if config.training.strategy == "multi_worker" and config.model.feature_statistics is not None:
        raise ConfigError(
            "model.feature_statistics: not supported with training.strategy=multi_worker (each worker would "
            "release its own noisy statistics)"
        )
    if config.training.strategy == "multi_worker" and config.sampling.seed is not None:
        raise ConfigError(
            "sampling.seed: not supported with training.strategy=multi_worker (each worker draws its shards from "
            "its own OS entropy, so a resumed run never replays a batch)"
        )
    if (config.privacy.target_epsilon is None) == (config.privacy.noise_multiplier is None):
        raise ConfigError(
            "privacy: set exactly one of target_epsilon and noise_multiplier (to replace a "
            "config's target, also --set privacy.target_epsilon=null)"
        )
    loss_names = [
        n
        for n, c in vars(losses).items()
        if inspect.isclass(c) and issubclass(c, losses.LipschitzLoss) and c is not losses.LipschitzLoss
    ]
    _check_choice("loss.type", config.loss.type, loss_names)
    accepted = _accepted_arguments(getattr(losses, config.loss.type))
    for key in config.loss.params:
        if key not in accepted:
            raise _unknown_key("loss.params.", key, sorted(accepted))


def load(path, overrides=()):
    """Reads a YAML config and applies ``key=value`` overrides."""
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    for override in overrides:
        apply_override(data, override)
    return from_dict(data)


def apply_override(data, override):
    """Sets ``a.b.c=value`` (list items by index: ``model.layers.2.units=64``) in ``data``."""
    if "=" not in override:
        raise ConfigError(f"--set expects key=value, got {override!r}")
    key, raw = override.split("=", 1)
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if node.get(part) is None:  # a null section (model.mechanism: null) takes keys too
                node[part] = {}
            node = node[part]
    last = parts[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def layer_class(type_name, path="model.layers"):
    """The layer class for a config ``type`` (at ``path``, for the error): lipdp layers first, then Keras'."""

    from lipdp import layers

    cls = getattr(layers, type_name, None) or getattr(keras.layers, type_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, keras.layers.Layer)):
        known = [
            n
            for n in layers.__all__
            if inspect.isclass(getattr(layers, n))
            and issubclass(getattr(layers, n), keras.layers.Layer)
            and not n.startswith("DP")
        ]
        close = difflib.get_close_matches(type_name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: unknown layer type {type_name!r}{hint}")
    return cls


def _accepted_arguments(cls):
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names.update(
            p
            for p, spec in inspect.signature(init).parameters.items()
            if spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL) and p != "self"
        )
    return names | {"name"}


def validate_layers(layer_specs):
    """Checks each ``{type: ..., **arguments}`` names a layer and only its arguments."""
    for index, spec in enumerate(layer_specs):
        validate_layer(f"model.layers.{index}", spec)


def frontend_layer(spec):
    """The front-end layer of a ``model.frontend`` spec: its keys, type and argument values checked.

    Built at config validation too (a front-end takes no data and creates no
    variable until built): a wrong value is a ConfigError before any data is read.
    """
    from lipdp.layers import FrontEnd

    cls = validate_layer("model.frontend", spec)
    if not issubclass(cls, FrontEnd):
        raise ConfigError(f"model.frontend: {cls.__name__} is not a lipdp front-end (e.g. Scattering2D)")
    try:
        return cls(**{k: v for k, v in spec.items() if k != "type"})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.frontend: {error}") from error


def validate_layer(path, spec):
    """The class of the layer spec ``{type: ..., **arguments}`` at ``path``, checked to take only those arguments."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{path}: expected a mapping with a 'type' key, got {spec!r}")
    cls = layer_class(spec["type"], path)
    accepted = _accepted_arguments(cls)
    for key in spec:
        if key != "type" and key not in accepted:
            raise _unknown_key(f"{path}.", key, sorted(accepted))
    return cls
