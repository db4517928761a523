"""Certified l2 robustness of a Lipschitz model: the input-to-logit Lipschitz constant and certified accuracy.

If the logits ``f`` are ``L``-Lipschitz in the l2 norm (over every non-batch
axis of the input and over the logit vector), each logit difference
``f_i - f_j`` is ``sqrt(2) L``-Lipschitz. An example classified correctly
with margin ``m`` (its label's logit minus the largest other logit) keeps its
prediction under every perturbation ``delta`` of the *model input* with
``||delta||_2 <= r`` whenever ``m > sqrt(2) L r``: its **certified radius**
is ``m / (sqrt(2) L)``. The **certified accuracy at radius r** is the
fraction of examples that are classified correctly with a certified radius
greater than ``r`` (at ``r = 0``: correct with a strict margin).

What the certificate assumes:

* ``L`` is the product of the constants the layers state for the weights in
  use (:meth:`lipdp.layers.DPLayer.lipschitz_constant`, spectral norms in
  float64, never trusted from a constraint), composed along the layer graph:
  a layer's output is ``L_layer`` times its input's constant, an ``Add`` sums
  its inputs' constants, an ``Average`` takes their mean. Each layer's
  constant is inflated by :data:`lipdp.layers.base.ROUNDING_MARGIN`, as the
  privacy bounds are, for float32 rounding. Margins are computed in float32.
* The radius is in the units of the model input: raw images for a model
  that holds its front-end (``lipdp train`` saves such a model), the
  front-end's features for a head trained on cached features.
  :class:`lipdp.layers.InputNormClip` (a projection onto a ball) is
  1-Lipschitz; :class:`lipdp.layers.ChannelStandardization` is
  ``max(1 / scale)``-Lipschitz; :class:`lipdp.layers.Scattering2D` states a
  bound computed from kymatio's filters (:func:`lipdp.layers.frontends.scattering_lipschitz_bound`).
* A model is **not certified**, with the reason, when a layer states no
  finite constant: a layer that is not a lipdp layer (``Dense``,
  ``BatchNormalization``, ...), a merge other than ``Add`` / ``Average``, or
  a front-end that is not globally Lipschitz (per-example group
  normalisation divides by the example's own standard deviation: two inputs
  close together with a small variance are mapped far apart). No radius is
  reported then.
* Only the forward pass counts: ``ClipGradient`` is the identity forward
  (constant 1), whatever it does to gradients.

Public API: :func:`certify` (a :class:`Certificate`), :func:`lipschitz_constant`,
:func:`certified_radii`, :func:`example_radii`, :func:`certified_accuracy` (a :class:`Certification`),
:func:`default_radii`, the Keras metric :class:`CertifiedAccuracy` and
:func:`bind_metrics`.
"""

import dataclasses
import math
import weakref
from typing import List, Optional

import numpy as np
import tensorflow as tf

from lipdp import sensitivity
from lipdp.backend import keras
from lipdp.errors import ModelNotSupportedError
from lipdp.layers import Add, Average, DPLayer, Scattering2D
from lipdp.layers.base import ROUNDING_MARGIN, as_bound

SQRT2 = math.sqrt(2.0)

#: Default radii of ``evaluation.certified_radii``, as fractions of ``model.input_norm`` (the input clip).
DEFAULT_RADIUS_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4)


class NotCertifiedError(ModelNotSupportedError):
    """The model's input-to-logit Lipschitz constant cannot be certified; the message says why."""


def _refusal(layer):
    """Why ``layer`` breaks the chain, or ``None`` if it states a finite constant."""
    if isinstance(layer, Scattering2D) and layer.normalize == "group":
        return (
            f"front-end {layer.name!r} (Scattering2D, normalize='group') divides each example by its own "
            "standard deviation: not globally Lipschitz (inputs close together with a small variance are "
            "mapped far apart)"
        )
    if not isinstance(layer, DPLayer):
        return (
            f"layer {layer.name!r} ({type(layer).__name__}) states no Lipschitz constant; "
            f"use {sensitivity.replacement_hint(layer)}"
        )
    if layer.multi_input and not isinstance(layer, (Add, Average)):
        return f"merge layer {layer.name!r} ({type(layer).__name__}): only Add and Average are composed"
    if not layer.multi_input and not np.isfinite(float(layer.lipschitz_constant())):
        return f"layer {layer.name!r} ({type(layer).__name__}) states no finite Lipschitz constant"
    return None


def _merge_constant(layer, constants):
    total = tf.add_n(constants)
    return total / len(constants) if isinstance(layer, Average) else total


def _constant_tensor(model):
    """The input-to-logit constant as a float64 tensor (graph-safe); the model must pass :func:`check`."""
    nodes = sensitivity.graph_nodes(model)
    constants = {str(id(t)): as_bound(1.0) for t in model.inputs}
    for node in nodes:
        if node.is_input:
            continue
        inputs = [constants[i] for i in node.input_ids]
        if node.layer.multi_input:
            out = _merge_constant(node.layer, inputs)
        else:
            out = node.layer.lipschitz_constant() * inputs[0]
        constants.update({i: out * (1.0 + ROUNDING_MARGIN) for i in node.output_ids})
    return constants[str(id(model.outputs[0]))]


def check(model):
    """Raises :class:`NotCertifiedError` naming the first layer that breaks the chain."""
    try:
        nodes = sensitivity.graph_nodes(model)
    except ModelNotSupportedError as error:
        raise NotCertifiedError(str(error)) from None
    if len(model.outputs) != 1 or model.outputs[0].shape.rank != 2:
        raise NotCertifiedError("the model must have one output of logits, shape (batch, classes)")
    for node in nodes:
        reason = None if node.is_input else _refusal(node.layer)
        if reason:
            raise NotCertifiedError(reason)


def lipschitz_constant(model):
    """Certified l2 Lipschitz constant from the model input to its logits; raises :class:`NotCertifiedError`."""
    check(model)
    return float(_constant_tensor(model))


@dataclasses.dataclass
class Certificate:
    """The model's constant, or why there is none (``lipschitz`` is ``None`` then)."""

    lipschitz: Optional[float]
    reason: Optional[str] = None

    @property
    def certified(self):
        return self.lipschitz is not None


def certify(model):
    """:class:`Certificate` of ``model``: never raises for a model that cannot be certified."""
    try:
        return Certificate(lipschitz_constant(model))
    except NotCertifiedError as error:
        return Certificate(None, str(error))


def _labels(y):
    y = np.asarray(y)
    return y.argmax(axis=-1) if y.ndim == 2 and y.shape[-1] > 1 else y.astype(int).reshape(-1)


def _margins(logits, labels):
    """The label's logit minus the largest other logit (negative when misclassified), per example."""
    logits = tf.convert_to_tensor(logits)
    labels = tf.cast(labels, tf.int32)
    own = tf.gather(logits, labels, batch_dims=1)
    others = tf.where(tf.one_hot(labels, tf.shape(logits)[-1]) > 0, tf.cast(-np.inf, logits.dtype), logits)
    return own - tf.reduce_max(others, axis=-1)


def certified_radii(logits, labels, lipschitz):
    """Per example, the certified radius ``margin / (sqrt(2) L)``; 0 for a misclassified or tied example.

    ``labels``: class indices or one-hot rows.
    """
    margins = np.asarray(_margins(np.asarray(logits, np.float32), _labels(labels)), np.float64)
    return np.maximum(margins, 0.0) / (SQRT2 * lipschitz)


@dataclasses.dataclass
class Certification:
    """Certified accuracy of a model on a data set at the given radii (none if not certified)."""

    radii: List[float]
    accuracy: float
    lipschitz: Optional[float]
    certified_accuracy: Optional[List[float]]
    reason: Optional[str] = None
    examples: int = 0

    @property
    def certified(self):
        return self.lipschitz is not None

    def to_dict(self):
        return dataclasses.asdict(self)

    def summary(self):
        head = f"clean accuracy {self.accuracy:.4f} on {self.examples} examples; "
        if not self.certified:
            return head + f"not certified: {self.reason}"
        pairs = ", ".join(f"r={r:g}: {a:.4f}" for r, a in zip(self.radii, self.certified_accuracy))
        return head + f"l2 Lipschitz constant input -> logits {self.lipschitz:.6g}; certified accuracy {pairs}"


def example_radii(model, x, y, batch_size=256):
    """``(accuracy, certificate, radii)``: the clean accuracy, :func:`certify`'s result and each example's
    certified radius (``None`` when the model is not certified)."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    labels = _labels(y)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels)) if len(labels) else 0.0
    certificate = certify(model)
    radii = certified_radii(logits, labels, certificate.lipschitz) if certificate.certified else None
    return accuracy, certificate, radii


def fraction_certified(example_radii_, radii):
    """The fraction of examples whose certified radius exceeds each of ``radii``."""
    return [float(np.mean(example_radii_ > r)) if len(example_radii_) else 0.0 for r in radii]


def certified_accuracy(model, x, y, radii, batch_size=256):
    """:class:`Certification` of ``model`` on ``(x, y)`` at each radius of ``radii`` (l2, model input units)."""
    radii = [float(r) for r in radii]
    if any(not r >= 0 for r in radii):
        raise ValueError(f"certified radii must be >= 0, got {radii}")
    accuracy, certificate, per_example = example_radii(model, x, y, batch_size)
    if not certificate.certified:
        return Certification(radii, accuracy, None, None, certificate.reason, len(x))
    return Certification(radii, accuracy, certificate.lipschitz, fraction_certified(per_example, radii), None, len(x))


def default_radii(input_norm):
    """:data:`DEFAULT_RADIUS_FRACTIONS` of the input clip's norm."""
    return [fraction * float(input_norm) for fraction in DEFAULT_RADIUS_FRACTIONS]


@keras.utils.register_keras_serializable("lipdp")
class CertifiedAccuracy(keras.metrics.Mean):
    """Fraction of examples classified correctly with a certified l2 radius greater than ``radius``.

    The model's constant is recomputed from its weights at every update
    (:func:`lipschitz_constant`), so the metric follows training. The metric
    needs its model: pass ``model=``, or compile a :class:`lipdp.DPSequential`
    / :class:`lipdp.DPModel` with it (their ``fit`` and ``evaluate`` bind it,
    also after a saved model is loaded). Binding a model that cannot be certified raises
    :class:`NotCertifiedError` with the reason. Shown as
    ``val_certified_accuracy_<radius>`` on validation data.
    """

    def __init__(self, radius, model=None, name=None, **kwargs):
        if not float(radius) >= 0:
            raise ValueError(f"CertifiedAccuracy radius must be >= 0, got {radius!r}")
        super().__init__(name=name or f"certified_accuracy_{float(radius):g}", **kwargs)
        self.radius = float(radius)
        self._model_ref = None
        if model is not None:
            self.bind(model)

    def bind(self, model):
        """Certifies ``model`` (raises :class:`NotCertifiedError` if it cannot be) and measures it from now on."""
        check(model)
        self._model_ref = weakref.ref(model)  # no reference cycle model -> metric -> model

    def update_state(self, y_true, y_pred, sample_weight=None):
        model = None if self._model_ref is None else self._model_ref()
        if model is None:
            raise NotCertifiedError(
                f"{self.name}: no model bound; pass model= or use it in a lipdp DPSequential / DPModel"
            )
        bound = tf.cast(SQRT2 * _constant_tensor(model) * self.radius, y_pred.dtype)
        one_hot = y_true.shape.rank == 2 and y_true.shape[-1] != 1
        labels = tf.argmax(y_true, axis=-1) if one_hot else tf.reshape(y_true, [-1])
        certified = tf.cast(_margins(y_pred, labels) > bound, self.dtype)
        return super().update_state(certified, sample_weight)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius}


def bind_metrics(model, metrics):
    """Binds every :class:`CertifiedAccuracy` in ``metrics`` (a list, dict or nested structure) to ``model``."""
    for metric in tf.nest.flatten(metrics):
        if isinstance(metric, CertifiedAccuracy):
            metric.bind(model)


__all__ = [
    "Certificate",
    "Certification",
    "CertifiedAccuracy",
    "NotCertifiedError",
    "bind_metrics",
    "certified_accuracy",
    "certified_radii",
    "certify",
    "check",
    "default_radii",
    "example_radii",
    "fraction_certified",
    "lipschitz_constant",
]
