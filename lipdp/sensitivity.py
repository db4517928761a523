"""Per-sample gradient norm bounds of a Lipschitz Keras model.

Bounds flow through the model's layer graph in two passes:

* forward: the input norm bound (set by :class:`lipdp.layers.InputNormClip`)
  is pushed through every layer's ``output_bound``;
* backward: the loss's Lipschitz constant w.r.t. the logits (the per-sample
  cotangent bound at the output) is pulled back through each layer's
  ``input_cotangent_bound``; a tensor used by several layers receives the sum
  of their cotangent bounds.

Each layer then turns (input bound, output cotangent bound) into a bound on
the per-sample gradient of each of its variables. All of it is computed from
the weights in use, never from data, and works inside a ``tf.function``.

Public API: :func:`validate`, :func:`gradient_bound_tensors`,
:func:`compute_bounds`, :func:`report`; :class:`CertifiedBounds`, the clipless
:class:`lipdp.mechanisms.GradientMechanism`. The bounds are checked against
true per-sample gradients by :mod:`lipdp.verification`.
"""

import dataclasses
from typing import List

import numpy as np
import tensorflow as tf

from lipdp import augmentation as augmentation_lib
from lipdp import backend, mechanisms
from lipdp.backend import keras
from lipdp.errors import ModelNotSupportedError
from lipdp.layers import DPLayer, InputNormClip, StepRelease
from lipdp.layers.base import HALF_PRECISION, ROUNDING_MARGIN, as_bound, refuse_half_precision
from lipdp.layers.frontends import FrontEnd
from lipdp.losses import LipschitzLoss

_REPLACEMENTS = {
    "Dense": "lipdp.layers.LipschitzDense",
    "Conv2D": "lipdp.layers.LipschitzConv2D",
    "BatchNormalization": "nothing: batch statistics mix samples; remove it or use lipdp.layers.LayerCentering",
    "LayerNormalization": "lipdp.layers.LayerCentering (dividing by the norm is not Lipschitz)",
    "Dropout": "nothing: remove it (it rescales activations by 1/(1-rate))",
    "Activation": "lipdp.layers.GroupSort, FullSort, ReLU or Abs",
    "ReLU": "lipdp.layers.ReLU",
    "MaxPooling2D": "lipdp.layers.MaxPooling2D",
    "AveragePooling2D": "lipdp.layers.L2NormPooling2D",
    "GlobalAveragePooling2D": "lipdp.layers.GlobalL2NormPooling2D",
    "Flatten": "lipdp.layers.Flatten",
    "Reshape": "lipdp.layers.Reshape",
    "Add": "lipdp.layers.Add",
    "Average": "lipdp.layers.Average",
    "Functional": "its layers inlined in one functional model (nested models are not supported)",
    "Sequential": "its layers inlined in one functional model (nested models are not supported)",
}


def replacement_hint(layer):
    name = type(layer).__name__
    if type(layer).__module__.startswith("deel.lip"):
        return (
            "a lipdp layer: deel-lip layers normalise their weights inside the forward pass, so the "
            "variable is not the weight used; lipdp.layers.LipschitzDense / LipschitzConv2D apply "
            "deel-lip's orthonormalisation as a constraint instead"
        )
    return _REPLACEMENTS.get(name, "a lipdp.layers layer, or implement the DPLayer protocol")


def graph_nodes(model):
    """The model's nodes, inputs first (Keras depth counts from the outputs)."""
    if not backend.is_graph_model(model):
        raise ModelNotSupportedError(
            "the model has no layer graph yet: give it an input shape "
            "(keras.Input(...) as first layer) before computing bounds"
        )
    return backend.layer_calls(model)


def model_loss(model):
    """The compiled loss, which must declare its Lipschitz constant."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, LipschitzLoss):
        return loss
    if loss is None:
        raise ModelNotSupportedError("compile the model with a lipdp.losses loss first")
    hint = ""
    if type(loss).__module__.startswith("deel.lip"):
        hint = (
            " deel-lip's KR/HKR losses normalise by the batch's class counts, so one sample's "
            "gradient depends on the others: use lipdp.losses.HingeKR, its per-sample form."
        )
    raise ModelNotSupportedError(
        f"loss {loss!r} declares no Lipschitz constant w.r.t. the logits; use one of "
        f"lipdp.losses (TauCategoricalCrossentropy, MulticlassHinge, HingeKR, KCosineSimilarity).{hint}"
    )


def precision_problems(model):
    """Every use of float16 / bfloat16: the global policy, a layer's policy, a variable.

    Bounds and clipping thresholds hold up to float32 rounding; in half
    precision the noise itself would also be drawn in half precision.
    """
    global_policy = keras.mixed_precision.global_policy()
    if {global_policy.compute_dtype, global_policy.variable_dtype} & set(HALF_PRECISION):
        yield (
            f"the global Keras dtype policy is {global_policy.name!r}; DP bounds need float32 or float64: "
            "call keras.mixed_precision.set_global_policy('float32') before building the model"
        )
    for layer in backend.nested_layers(model, include_self=True):
        try:
            refuse_half_precision(layer)
        except ModelNotSupportedError as error:
            yield str(error)
    for variable in model.variables:
        if variable.dtype.base_dtype.name in HALF_PRECISION:
            yield f"variable {variable.name} is {variable.dtype.name}; DP bounds need float32 or float64"


def check_precision(model):
    """Raises :class:`ModelNotSupportedError` naming every half-precision use (:func:`precision_problems`)."""
    raise_problems(list(precision_problems(model)))


def raise_problems(problems):
    """One :class:`ModelNotSupportedError` naming every problem found, so a user fixes them all in one pass."""
    if len(problems) == 1:
        raise ModelNotSupportedError(problems[0])
    if problems:
        raise ModelNotSupportedError(
            f"{len(problems)} problems: " + " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        )


def model_problems(model):
    """Everything that keeps the certified bounds from applying to ``model``, one message each."""
    nodes = graph_nodes(model)
    yield from precision_problems(model)
    if len(model.outputs) != 1:
        yield f"the model has {len(model.outputs)} outputs; exactly one is supported"
    try:
        model_loss(model)
    except ModelNotSupportedError as error:
        yield str(error)
    for node in nodes:
        if not node.is_input and not isinstance(node.layer, DPLayer):
            yield (
                f"layer {node.layer.name!r} ({type(node.layer).__name__}) has no privacy bound; use "
                f"{replacement_hint(node.layer)}"
            )
    if model.outputs and model.outputs[0].shape.rank != 2:
        yield (
            f"the model output has shape {model.outputs[0].shape}; the loss bounds assume one logit vector "
            "per sample, shape (batch, classes): add lipdp.layers.Flatten or a global pooling before the last layer"
        )
    yield from _unclipped_input_problems(model, nodes)


def validate(model):
    """Raises :class:`ModelNotSupportedError` naming every problem of :func:`model_problems` at once."""
    raise_problems(list(model_problems(model)))


def _unclipped_input_problems(model, nodes):
    """Only front-ends (fixed per-example maps) may come before the input clip, and only the clip after them."""
    unclipped = {str(id(t)) for t in model.inputs}  # the model input and front-end outputs
    for node in nodes:
        if node.is_input or isinstance(node.layer, InputNormClip):
            continue
        reads_unclipped = bool(unclipped.intersection(node.input_ids))
        if isinstance(node.layer, FrontEnd):
            if not reads_unclipped or node.layer.trainable_weights:
                yield (
                    f"front-end {node.layer.name!r} must come before lipdp.layers.InputNormClip and have no "
                    "trainable variables (a fixed per-example map)"
                )
            unclipped.update(node.output_ids)
        elif reads_unclipped:
            yield (
                f"layer {node.layer.name!r} reads the model input directly; put "
                "lipdp.layers.InputNormClip(norm) first so the input norm is bounded"
            )


@dataclasses.dataclass
class LayerBounds:
    """What the bound propagation found at one layer call."""

    layer: keras.layers.Layer
    input_bound: tf.Tensor
    cotangent_bound: tf.Tensor
    lipschitz: tf.Tensor
    gradient_bounds: list


def _with_margin(bound):
    """``bound * (1 + ROUNDING_MARGIN)``: every stated bound covers float32 rounding (``None``: unbounded)."""
    return None if bound is None else bound * (1.0 + ROUNDING_MARGIN)


def propagate(model, views=1) -> List[LayerBounds]:
    """Runs both passes and returns the bounds of every layer call, inputs first.

    Every bound a layer or the loss states is inflated by
    :data:`lipdp.layers.base.ROUNDING_MARGIN` as it is used. ``views``: the
    loss of each of an example's ``views`` augmented views is ``1/views`` of
    the loss (:mod:`lipdp.augmentation`), so the backward pass starts from
    the loss's Lipschitz constant divided by ``views``; the gradient bounds
    are then those of one view.
    """
    validate(model)
    nodes = [node for node in graph_nodes(model) if not node.is_input]
    loss = model_loss(model)
    norms = {}
    for node in nodes:
        inputs = [norms.get(i) for i in node.input_ids]
        node_input = inputs if node.layer.multi_input else inputs[0]
        out = _with_margin(node.layer.output_bound(node_input))
        norms.update({i: out for i in node.output_ids})
    output = model.outputs[0]
    start = as_bound(loss.logit_lipschitz(int(output.shape[-1]))) / views
    cotangents = {str(id(output)): _with_margin(start)}
    records = []
    for node in reversed(nodes):
        layer = node.layer
        cotangent = tf.add_n([cotangents.get(i, as_bound(0.0)) for i in node.output_ids])
        inputs = [norms.get(i) for i in node.input_ids]
        node_input = inputs if layer.multi_input else inputs[0]
        upstream = layer.input_cotangent_bound(cotangent)
        upstream = upstream if layer.multi_input else [upstream]
        for input_id, bound in zip(node.input_ids, upstream):
            cotangents[input_id] = cotangents.get(input_id, as_bound(0.0)) + _with_margin(bound)
        grads = layer.gradient_bounds(node_input, cotangent) if layer.trainable else []
        grads = [(variable, _with_margin(bound)) for variable, bound in grads]
        records.append(LayerBounds(layer, node_input, cotangent, layer.lipschitz_constant(), grads))
    return records[::-1]


def gradient_bound_tensors(model, records=None, views=1):
    """Bounds aligned with ``model.trainable_variables`` (float64 scalars).

    A layer called several times (shared weights) gets the sum of the bounds
    of its calls. Raises if a trainable variable gets no bound. ``records``:
    the result of :func:`propagate`, when the caller already has it.
    ``views``: an example's gradient is the sum of its ``views`` views'
    gradients, each bounded by ``propagate(model, views)``: the bounds are
    ``views`` times those (see :mod:`lipdp.augmentation`).
    """
    by_variable = {}
    for record in propagate(model, views) if records is None else records:
        for variable, bound in record.gradient_bounds:
            key = variable.ref()
            bound = bound * views
            by_variable[key] = by_variable[key] + bound if key in by_variable else bound
    missing = [v.name for v in model.trainable_variables if v.ref() not in by_variable]
    if missing:
        raise ModelNotSupportedError(f"no gradient bound for trainable variable(s) {missing}")
    return [by_variable[v.ref()] for v in model.trainable_variables]


@mechanisms.register
class CertifiedBounds(mechanisms.GradientMechanism):
    """Clipless DP: the plain gradient of the summed per-sample losses, and certified per-variable bounds.

    The sum is the ordinary batch gradient (no per-sample work); its
    sensitivity is :func:`gradient_bound_tensors` for the weights in use at
    this step.
    """

    name = "certified"
    certifies_layer_bounds = True

    def __init__(self, augmentation=None):
        if isinstance(augmentation, dict):
            augmentation = augmentation_lib.AugmentationMultiplicity.from_config(augmentation)
        self.augmentation = augmentation

    @property
    def views(self):
        """Views per example: the augmentation multiplicity, 1 without augmentation."""
        return 1 if self.augmentation is None else self.augmentation.multiplicity

    def validate(self, model):
        validate(model)
        if self.views > 1 and any(isinstance(n.layer, StepRelease) for n in graph_nodes(model)):
            raise ModelNotSupportedError(
                "augmentation multiplicity with a per-step release layer (AdaptiveClipGradient): its count would see "
                "each example once per view (sensitivity K, not 1); use a fixed ClipGradient or multiplicity 1"
            )

    def gradient_sums(self, model, x, y):
        forward = augmentation_lib.plain_forward if self.augmentation is None else self.augmentation.forward
        with tf.GradientTape() as tape:
            y_pred, per_sample_loss = forward(model, x, y)
            loss_sum = tf.reduce_sum(per_sample_loss)
        sums = tape.gradient(loss_sum, model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        bounds = gradient_bound_tensors(model, views=self.views)
        return mechanisms.PrivateGradient(y_pred, per_sample_loss, sums, mechanisms.Sensitivity.of_variables(bounds))

    def describe(self):
        if self.augmentation is None:
            return "certified per-sample gradient bounds"
        return f"certified per-sample gradient bounds ({self.views} augmented views per example, losses averaged)"

    def get_config(self):
        config = super().get_config()
        if self.augmentation is not None:
            config["augmentation"] = self.augmentation.get_config()
        return config


def short_variable_name(variable):
    """``kernel`` for ``dense/kernel:0``."""
    return variable.name.split("/")[-1].split(":")[0]


def variable_names(model):
    """Unique names ``layer/variable`` aligned with ``model.trainable_variables``."""
    owners = {v.ref(): layer.name for layer in model.layers for v in layer.trainable_weights}
    return [f"{owners[v.ref()]}/{short_variable_name(v)}" for v in model.trainable_variables]


def compute_bounds(model):
    """``{layer/variable: per-sample gradient norm bound}`` for the per-sample loss."""
    bounds = gradient_bound_tensors(model)
    return {name: float(b) for name, b in zip(variable_names(model), bounds)}


BOUND_HEADER = [
    "layer",
    "type",
    "input-norm bound",
    "cotangent bound",
    "Lipschitz",
    "variable",
    "per-sample gradient bound",
]


def format_bound(value, spec=".4g"):
    """A bound as table text: ``inf`` for none, ``a + b`` for a merge's inputs."""
    if value is None:
        return "inf"
    if isinstance(value, (list, tuple)):
        return " + ".join(format_bound(v, spec) for v in value)
    value = float(value)
    return format(value, spec) if np.isfinite(value) else str(value)


def mechanism_views(model):
    """Views per example of the model's mechanism (its augmentation multiplicity; 1 without)."""
    return getattr(getattr(model, "mechanism", None), "views", 1)


def bound_rows(model, records=None, views=1):
    """The per-layer bound table both reports render: ``[(cells, variable or None)]`` under :data:`BOUND_HEADER`.

    One row per (layer call, variable), or per layer call without variables;
    the layer's cells are blank after its first row. With ``views > 1``
    (``records`` from ``propagate(model, views)``), the cotangents are a
    view's and the gradient bounds an example's (``views`` times a view's).
    """
    rows = []
    for record in propagate(model, views) if records is None else records:
        layer_cells = [
            record.layer.name,
            type(record.layer).__name__,
            format_bound(record.input_bound),
            format_bound(record.cotangent_bound),
            format_bound(record.lipschitz, ".6g"),
        ]
        for variable, bound in record.gradient_bounds or [(None, None)]:
            cells = ["-", "-"] if variable is None else [short_variable_name(variable), format_bound(bound * views)]
            rows.append((layer_cells + cells, variable))
            layer_cells = [""] * len(layer_cells)
    return rows


def report(model):
    """A readable per-layer table of the bounds (:func:`bound_rows`) and the global sensitivity."""
    views = mechanism_views(model)
    records = propagate(model, views)
    rows = [BOUND_HEADER] + [cells for cells, _ in bound_rows(model, records, views)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(BOUND_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bounds = gradient_bound_tensors(model, records, views)
    total = float(tf.norm(tf.stack(bounds))) if bounds else 0.0
    if views > 1:
        lines.append(f"\n{views} augmented views per example: cotangents per view, gradient bounds per example")
    lines.append(f"\nglobal sensitivity (l2 norm of all variable bounds): {total:.6g}")
    return "\n".join(lines)
