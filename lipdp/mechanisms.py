"""Gradient mechanisms: how a private step gets its gradient sum, and that sum's sensitivity.

A DP model depends on this protocol only. A :class:`GradientMechanism`

* ``validate(model)``: raises :class:`lipdp.errors.ModelNotSupportedError`
  naming what the mechanism cannot handle;
* ``gradient_sums(model, x, y)``: returns a :class:`PrivateGradient`, the
  sum over the batch of each example's contribution and the
  :class:`Sensitivity` of that sum (how far one example can move it);
* ``describe()``: a phrase for the privacy statement;
* ``get_config()``: its settings, with ``name`` the key under which it is
  registered (:func:`register`), so :func:`from_config` rebuilds it.

Implementations: :class:`lipdp.sensitivity.CertifiedBounds` (clipless: the
plain gradient and the certified per-variable bounds of a Lipschitz network)
and the clipping rules of :mod:`lipdp.clipping`. The model adds Gaussian noise
to the sums once, calibrated to the sensitivity (see
:meth:`Sensitivity.noise_stddevs`), then divides by the expected batch size.
"""

import dataclasses
import math
from typing import List, Optional

import tensorflow as tf

from lipdp.accounting import NOISE_ALLOCATIONS
from lipdp.errors import ModelNotSupportedError


@dataclasses.dataclass
class Sensitivity:
    """How far one example can move the gradient sums: per variable, or only as a whole.

    ``per_variable``: float64 bounds ``C_i`` aligned with the model's
    trainable variables (certified bounds), or ``None`` when only the whole
    contribution is bounded (clipping). ``total``: the l2 bound of the whole
    contribution, ``||(C_1..C_k)||_2`` when per-variable bounds exist.
    """

    total: tf.Tensor
    per_variable: Optional[List[tf.Tensor]] = None

    @classmethod
    def of_variables(cls, bounds):
        """From per-variable bounds; the total is their l2 norm."""
        bounds = list(bounds)
        return cls(total=tf.norm(tf.stack(bounds)), per_variable=bounds)

    @classmethod
    def of_whole_contribution(cls, bound):
        """Only the whole contribution is bounded (e.g. clipped to norm ``bound``)."""
        return cls(total=tf.constant(float(bound), tf.float64))

    def noise_stddevs(self, noise_multiplier, allocation, num_variables):
        """Per-variable noise standard deviation on the gradient *sum* (float64 scalars).

        * whole-contribution sensitivity ``S``: ``sigma S`` on every coordinate
          (the textbook Gaussian mechanism; there is nothing to allocate);
        * per-variable, ``"global"``: ``sigma ||C||_2`` on every coordinate;
        * per-variable, ``"per-layer"``: ``sigma sqrt(k) C_i`` on variable ``i``.
          ``k`` Gaussian mechanisms with multipliers ``sigma sqrt(k)`` compose
          into one with ``1/sigma^2 = sum_i 1/(k sigma^2)``, so the accountant
          sees the single multiplier ``sigma`` in every case.
        """
        if allocation not in NOISE_ALLOCATIONS:
            raise ValueError(f"noise_allocation={allocation!r} is not one of {NOISE_ALLOCATIONS}")
        if self.per_variable is None or allocation == "global":
            return [noise_multiplier * self.total for _ in range(num_variables)]
        scale = noise_multiplier * math.sqrt(len(self.per_variable))
        return [scale * bound for bound in self.per_variable]


@dataclasses.dataclass
class PrivateGradient:
    """What a mechanism hands the train step: predictions, per-example losses, sums, sensitivity."""

    y_pred: tf.Tensor
    per_sample_loss: tf.Tensor
    sums: list
    sensitivity: Sensitivity


class GradientMechanism:
    """The protocol (see the module docstring). Subclasses set ``name`` and register themselves."""

    name = None
    #: True when the mechanism certifies per-layer bounds that reports can show and verify.
    certifies_layer_bounds = False

    def validate(self, model):
        raise NotImplementedError

    def gradient_sums(self, model, x, y) -> PrivateGradient:
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def get_config(self):
        return {"name": self.name}

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


_REGISTRY = {}


def register(cls):
    """Class decorator: makes ``cls`` buildable from its ``name`` by :func:`from_config` and :func:`build`."""
    _REGISTRY[cls.name] = cls
    return cls


def names():
    """The registered mechanism names."""
    return tuple(_REGISTRY)


def from_config(config):
    """The mechanism a ``get_config()`` dict describes."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _REGISTRY:
        raise ModelNotSupportedError(f"unknown gradient mechanism {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**config)


def build(clipping=None, clip_norm=1.0, gamma=0.01):
    """The mechanism of the models' ``clipping=`` argument: ``None`` is clipless (certified bounds)."""
    if clipping is None:
        return from_config({"name": "certified"})
    rules = tuple(name for name, cls in _REGISTRY.items() if not cls.certifies_layer_bounds)
    if clipping not in rules:
        raise ValueError(f"clipping={clipping!r} is not one of {(None,) + rules}")
    return from_config({"name": clipping, "clip_norm": clip_norm, "gamma": gamma})
