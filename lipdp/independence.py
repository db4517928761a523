"""Per-example independence: a probe that no layer, loss or gradient, however nested, mixes examples.

Both mechanisms bound how far *one* example moves the gradient sum: clipless
training by certified per-layer bounds, clipping by each example's own
gradient norm. Both assume that, in training mode, example ``i``'s outputs,
loss and cotangents depend on example ``i`` alone, and that the forward pass
writes nothing derived from the batch into the model. A layer that breaks
either (batch statistics, a ``Lambda`` reducing over axis 0, a custom
gradient normalising over the batch, a loss weighting classes by their batch
frequency, ``BatchNormalization``'s moving averages, at any depth of nesting)
voids the bound, or releases data outside the accountant. Looking for such
layers by class misses nested and custom ones, so
:func:`check_examples_independent` tests the behaviour itself, on the model
as built, with its compiled loss:

* a random batch of :data:`PROBE_BATCH` examples (and one-hot labels) runs in
  training mode; then, for each example ``j`` in turn, the same batch with
  example ``j`` (input and label) replaced. Every other example's output at
  every layer call, its loss, and its cotangent at every layer output must
  stay the same, element by element (up to :data:`MIXING_TOLERANCE`);
* no variable of the model may change during those passes (they are all
  restored afterwards, so the probe leaves the model as it found it).

Randomness repeats across the passes: the random generators of the layers
(``RandomFlip`` and other augmentation layers) are reset to one state, and
legacy random ops (``Dropout``) run under a fixed global seed; the caller's
global seed is set back afterwards (its random stream restarts).

The probe catches mistakes, not a layer written to evade it: mixing only at
batch sizes other than :data:`PROBE_BATCH` or only inside a ``tf.function``
(the probe runs eagerly) is not seen.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from lipdp import backend
from lipdp.errors import ModelNotSupportedError

#: Examples in the probe batch (more than 4, a size some layers special-case).
PROBE_BATCH = 6
#: Element-wise change of another example's values that counts as mixing, relative to ``1 + |value|``.
MIXING_TOLERANCE = 1e-6


def _probe_inputs(model, rng):
    """``(batch, replacements)``: one array per model input, and a different example for each position."""
    batch, replacements = [], []
    for tensor in model.inputs:
        shape = (PROBE_BATCH,) + tuple(8 if d is None else d for d in tensor.shape[1:])
        if tensor.dtype.is_integer or tensor.dtype.is_bool:  # indices (embeddings): 0 or 1 is valid for any
            values = rng.integers(0, 2, size=shape)
            other = 1 - values
        else:
            values = rng.normal(size=shape)
            other = 10.0 * rng.normal(size=shape) + 3.0
        batch.append(values.astype(tensor.dtype.as_numpy_dtype))
        replacements.append(other.astype(tensor.dtype.as_numpy_dtype))
    return batch, replacements


def _probe_labels(classes, rng):
    labels = rng.integers(0, classes, size=PROBE_BATCH)
    return np.eye(classes, dtype="float32")[labels], np.eye(classes, dtype="float32")[(labels + 1) % classes]


def _replace(arrays, replacements, j):
    changed = [a.copy() for a in arrays]
    for array, other in zip(changed, replacements):
        array[j] = other[j]
    return changed


class _Probe:
    """The model's layer-call outputs, per-example losses and cotangents in training mode, under fixed randomness.

    The model runs layer call by layer call (:func:`lipdp.backend.run_layer_by_layer`), so each recorded
    output is the tensor the next layers read, and its cotangent is the one they send back.
    """

    def __init__(self, model):
        self.model = model
        self.loss = getattr(model, "loss", None)
        self.layers = []  # the layer of each recorded output, in call order
        self.generators = []

    def fix_randomness(self):
        """Snapshots the state of every random generator of the layers (created by a first pass)."""
        self.generators = [(g, g.state.numpy()) for g in backend.random_generators(self.model)]

    def __call__(self, inputs, labels):
        for generator, state in self.generators:
            generator.state.assign(state)
        tf.random.set_seed(0)
        layers, outputs = [], []
        tape = tf.GradientTape()

        def call_layer(layer, args, kwargs):
            if backend.expects_training_argument(layer):
                kwargs = {**kwargs, "training": True}
            result = layer(*args, **kwargs)
            for tensor in tf.nest.flatten(result):
                tape.watch(tensor)
                layers.append(layer)
                outputs.append(tensor)
            return result

        inputs = [tf.constant(a) for a in inputs]
        with tape:
            y_pred = backend.run_layer_by_layer(self.model, inputs if len(inputs) > 1 else inputs[0], call_layer)
            losses = None
            if callable(getattr(self.loss, "call", None)) and y_pred.shape.rank == 2:
                losses = self.loss.call(tf.constant(labels), y_pred)
                total = tf.reduce_sum(losses)
        self.layers = layers
        values = [np.asarray(t, np.float64) for t in outputs]
        if losses is None:
            return values, None, [None] * len(outputs)
        cotangents = tape.gradient(total, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return values, np.asarray(losses, np.float64), [np.asarray(c, np.float64) for c in cotangents]


def _moved(before, after, j):
    """Whether any example but ``j`` changed."""
    if before is None:
        return False
    keep = np.arange(len(before)) != j
    others_before, others_after = before[keep], after[keep]
    if not np.all(np.isfinite(others_after) == np.isfinite(others_before)):
        return True
    finite = np.isfinite(others_before)
    change = np.abs(others_after[finite] - others_before[finite])
    return bool(np.any(change > MIXING_TOLERANCE * (1.0 + np.abs(others_before[finite]))))


def _first_moved(base, variants, positions):
    """The first position (in ``positions`` order) whose values move for some replaced example, else ``None``."""
    for position in positions:
        if any(_moved(base[position], variant[position], j) for j, variant in enumerate(variants)):
            return position
    return None


def _mixing_problem(probe, base, variants):
    """What mixes examples, or ``None``: the first layer whose outputs do, else the loss, else a gradient.

    A custom gradient mixing examples moves the cotangents of the layer
    outputs before it: the last output whose cotangent moves feeds it.
    """
    outputs, losses, cotangents = (list(part) for part in zip(base, *variants))
    positions = range(len(probe.layers))
    forward = _first_moved(outputs[0], outputs[1:], positions)
    if forward is not None:
        layer = probe.layers[forward]
        return (
            f"layer {layer.name!r} ({type(layer).__name__}): in training mode, one example changes the other "
            "examples' outputs (batch statistics or a reduction over the batch, possibly in a nested layer); use "
            "per-example layers (e.g. lipdp.layers.LayerCentering or GroupNormalization, not BatchNormalization)"
        )
    if losses[0] is not None and any(_moved(losses[0], other, j) for j, other in enumerate(losses[1:])):
        return (
            f"loss {probe.loss!r}: one example changes the other examples' losses (e.g. weights from the batch's "
            "class counts); use a per-example loss (lipdp.losses, or a Keras loss without batch-dependent weights)"
        )
    if cotangents[0][0] is None:
        return None
    backward = _first_moved(cotangents[0], cotangents[1:], reversed(positions))
    if backward is None:
        return None
    layer = probe.layers[backward]
    return (
        f"the gradient reaching the output of layer {layer.name!r} ({type(layer).__name__}) mixes examples: a "
        "layer after it has a custom gradient that reduces over the batch; make its gradient per example"
    )


def _owner(model, variable):
    """The innermost layer holding ``variable``."""
    owners = [layer for layer in backend.nested_layers(model) if any(variable is v for v in layer.variables)]
    return owners[-1] if owners else model


def check_examples_independent(model, seed=0):
    """Raises :class:`ModelNotSupportedError` naming what mixes examples or writes batch state; every problem at once.

    The model needs a layer graph (``tf.keras.Input`` first).
    """
    if not backend.is_graph_model(model):
        raise ModelNotSupportedError("the model has no layer graph yet: give it an input (tf.keras.Input(...) first)")
    rng = np.random.default_rng(seed)
    batch, replacements = _probe_inputs(model, rng)
    labels, other_labels = _probe_labels(int(model.outputs[0].shape[-1] or 2), rng)
    probe = _Probe(model)
    variables = list(model.variables)
    saved = [np.array(v.numpy()) for v in variables]
    previous_seed = context.global_seed()
    originals = [(g, g.state.numpy()) for g in backend.random_generators(model)]
    try:
        probe(batch, labels)  # creates any lazily made random generator
        probe.fix_randomness()
        base = probe(batch, labels)
        variants = [
            probe(_replace(batch, replacements, j), _replace([labels], [other_labels], j)[0])
            for j in range(PROBE_BATCH)
        ]
        updated = [v for v, value in zip(variables, saved) if not np.array_equal(v.numpy(), value)]
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
        for generator, state in originals:
            generator.state.assign(state)
        tf.random.set_seed(previous_seed)
    problems = [problem for problem in [_mixing_problem(probe, base, variants)] if problem]
    for variable in updated:
        layer = _owner(model, variable)
        problems.append(
            f"layer {layer.name!r} ({type(layer).__name__}): its forward pass in training mode writes the variable "
            f"{variable.name} from the batch (e.g. BatchNormalization's moving statistics), a release of private "
            "data no accountant covers; remove it or use a per-example normalisation"
        )
    if problems:
        raise ModelNotSupportedError("the model does not keep examples independent:\n- " + "\n- ".join(problems))
