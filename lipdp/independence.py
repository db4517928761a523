"""Per-example independence: a probe that no layer, however nested, mixes examples or keeps batch state.

Both mechanisms bound how far *one* example moves the gradient sum: clipless
training by certified per-layer bounds, clipping by each example's own
gradient norm. Both assume that, in training mode, example ``i``'s output
depends on example ``i`` alone, and that the forward pass writes nothing
derived from the batch into the model. A layer that breaks either (batch
statistics, a ``Lambda`` reducing over axis 0, ``BatchNormalization``'s
moving averages, at any depth of nesting) voids the bound, or releases data
outside the accountant. Looking for such layers by class misses nested and
custom ones, so :func:`check_examples_independent` tests the behaviour
itself, on the model as built:

* the model runs in training mode on a random batch, then on the same batch
  with its first example replaced; every other example's output, at every
  layer call of the graph, must stay the same (up to float rounding);
* no non-trainable variable may change during those forward passes (they
  are restored afterwards, so the probe leaves the model as it found it).

Layers with randomness of their own (``Dropout``) draw under a fixed
operation seed in both passes, so their masks do not differ between them.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from lipdp.errors import ModelNotSupportedError

#: Examples in the probe batch.
PROBE_BATCH = 4
#: Relative change of another example's activations that counts as mixing (float32 rounding is ~1e-7).
MIXING_TOLERANCE = 1e-4


def _probe_inputs(model, rng):
    """``(batch, batch with example 0 replaced)``, one array per model input."""
    batch, changed = [], []
    for tensor in model.inputs:
        shape = (PROBE_BATCH,) + tuple(8 if d is None else d for d in tensor.shape[1:])
        if tensor.dtype.is_integer or tensor.dtype.is_bool:  # indices (embeddings): 0 or 1 is valid for any
            values = rng.integers(0, 2, size=shape)
            other = 1 - values[:1]
        else:
            values = rng.normal(size=shape)
            other = 10.0 * rng.normal(size=(1,) + shape[1:]) + 3.0
        values = values.astype(tensor.dtype.as_numpy_dtype)
        batch.append(values)
        changed.append(np.concatenate([other.astype(values.dtype), values[1:]]))
    return batch, changed


def _layer_calls(model):
    """``[(layer, output tensors)]`` of every layer call of a graph model, inputs first."""
    depths = sorted(model._nodes_by_depth, reverse=True)
    nodes = [node for depth in depths for node in model._nodes_by_depth[depth] if not node.is_input]
    return [(node.layer, tf.nest.flatten(node.outputs)) for node in nodes]


def _forward(model, outputs, inputs):
    """Every layer call's outputs in training mode, under a fixed global seed (``Dropout`` masks repeat).

    The caller's global seed is put back afterwards.
    """
    probe = tf.keras.Model(model.inputs, outputs)
    previous = context.global_seed()
    tf.random.set_seed(0)
    try:
        return [np.asarray(t, np.float64) for t in tf.nest.flatten(probe(inputs, training=True))]
    finally:
        tf.random.set_seed(previous)


def _mixes(before, after):
    others_before, others_after = before[1:], after[1:]
    scale = 1.0 + float(np.max(np.abs(others_before), initial=0.0))
    return (
        not np.all(np.isfinite(others_after))
        or np.max(np.abs(others_after - others_before), initial=0.0) > MIXING_TOLERANCE * scale
    )


def _owner(model, variable):
    """The top-level layer holding ``variable``."""
    for layer in model.layers:
        if any(variable is v for v in layer.variables):
            return layer
    return model


def check_examples_independent(model, seed=0):
    """Raises :class:`ModelNotSupportedError` naming each layer that mixes examples or keeps batch state.

    The model needs a layer graph (``tf.keras.Input`` first). Every problem
    found is reported at once.
    """
    if not getattr(model, "_is_graph_network", False) or model.inputs is None:
        raise ModelNotSupportedError("the model has no layer graph yet: give it an input (tf.keras.Input(...) first)")
    calls = _layer_calls(model)
    outputs = [t for _, tensors in calls for t in tensors]
    batch, changed = _probe_inputs(model, np.random.default_rng(seed))
    state = list(model.non_trainable_variables)
    saved = [v.numpy() for v in state]
    try:
        before, after = _forward(model, outputs, batch), _forward(model, outputs, changed)
        updated = [v for v, value in zip(state, saved) if not np.array_equal(v.numpy(), value)]
    finally:
        for variable, value in zip(state, saved):
            variable.assign(value)
    problems = []
    position = 0
    for layer, tensors in calls:
        pairs = zip(before[position : position + len(tensors)], after[position : position + len(tensors)])
        position += len(tensors)
        if any(_mixes(b, a) for b, a in pairs):
            problems.append(
                f"layer {layer.name!r} ({type(layer).__name__}): in training mode, one example's input changes "
                "the other examples' outputs (batch statistics or a reduction over the batch, possibly in a "
                "nested layer); use per-example layers (e.g. lipdp.layers.LayerCentering or GroupNormalization "
                "instead of BatchNormalization)"
            )
            break  # every later layer inherits the mixing
    for variable in updated:
        layer = _owner(model, variable)
        problems.append(
            f"layer {layer.name!r} ({type(layer).__name__}): its forward pass in training mode updates the "
            f"non-trainable variable {variable.name} from the batch (e.g. BatchNormalization's moving statistics), "
            "a release of private data no accountant covers; remove it or use a per-example normalisation"
        )
    if problems:
        raise ModelNotSupportedError("the model does not keep examples independent:\n- " + "\n- ".join(problems))
