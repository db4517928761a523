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
import difflib
import inspect
import math
from typing import List, Optional

import tensorflow as tf

from lipdp.errors import ModelNotSupportedError
from lipdp.policy import NOISE_ALLOCATIONS


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


def microbatched_gradient_sums(mechanism, model, x, y, size) -> PrivateGradient:
    """``mechanism``'s sums, accumulated over micro-batches of ``size`` examples (memory flat in the batch).

    One logical Poisson step: the sums of all micro-batches are added
    before the noise (added once, by the caller) and the division by the
    expected batch size. The sensitivity comes from an empty micro-batch
    (it does not depend on the data), so an empty batch works too. The
    loop runs one micro-batch at a time (``parallel_iterations=1``).
    """
    empty = mechanism.gradient_sums(model, x[:0], y[:0])
    count = (tf.shape(x)[0] + size - 1) // size

    def step(i, sums, predictions, losses):
        part = mechanism.gradient_sums(model, x[i * size : (i + 1) * size], y[i * size : (i + 1) * size])
        sums = [total + tf.convert_to_tensor(g) for total, g in zip(sums, part.sums)]
        return i + 1, sums, predictions.write(i + 1, part.y_pred), losses.write(i + 1, part.per_sample_loss)

    def collector(tensor):
        array = tf.TensorArray(
            tensor.dtype,
            size=1,
            dynamic_size=True,
            infer_shape=False,
            element_shape=tf.TensorShape([None]).concatenate(tensor.shape[1:]),
        )
        return array.write(0, tensor)

    initial = (
        tf.constant(0),
        [tf.convert_to_tensor(g) for g in empty.sums],
        collector(empty.y_pred),
        collector(empty.per_sample_loss),
    )
    _, sums, predictions, losses = tf.while_loop(lambda i, *_: i < count, step, initial, parallel_iterations=1)
    return PrivateGradient(predictions.concat(), losses.concat(), sums, empty.sensitivity)


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
    """Class decorator: makes ``cls`` buildable from its ``name`` (:func:`get`, :func:`from_config`)."""
    _REGISTRY[cls.name] = cls
    return cls


def registered():
    """``{name: class}`` of every registered mechanism."""
    return dict(_REGISTRY)


def from_config(config):
    """The mechanism a ``get_config()`` dict describes."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelNotSupportedError(f"unknown gradient mechanism {name!r}{hint}; registered: {', '.join(_REGISTRY)}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ModelNotSupportedError(
            f"gradient mechanism {name!r} takes {', '.join(accepted) or 'no settings'}; unknown: {', '.join(unknown)}"
        )
    return cls(**config)


def get(identifier=None):
    """The mechanism ``identifier`` names, as Keras' ``get`` functions do.

    ``None``: clipless training with certified bounds; a name (``"certified"``,
    ``"flat"``, ``"automatic"``, ``"global"``) with its default settings; a
    ``get_config()`` dict (``{"name": "flat", "clip_norm": 0.1}``); or a
    :class:`GradientMechanism`, returned as it is.
    """
    if identifier is None:
        identifier = "certified"
    if isinstance(identifier, GradientMechanism):
        return identifier
    if isinstance(identifier, str):
        return from_config({"name": identifier})
    if isinstance(identifier, dict):
        return from_config(identifier)
    raise ModelNotSupportedError(
        f"mechanism={identifier!r}: expected a name, a config dict or a lipdp.mechanisms.GradientMechanism"
    )
