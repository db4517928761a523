"""The one seam between lipdp and Keras: which Keras it uses, and every use of Keras internals.

lipdp is written for the Keras 2 API. Which package provides it depends on
the TensorFlow version:

* TensorFlow 2.15: ``tf.keras`` (Keras 2.15, built in);
* TensorFlow 2.16 and later: ``tf_keras`` (the ``tf-keras`` package), since
  ``tf.keras`` is Keras 3 there unless ``TF_USE_LEGACY_KERAS=1`` is set
  before Keras is first used.

:data:`keras` is that module, also exported as ``lipdp.keras``. Importing
lipdp sets ``TF_USE_LEGACY_KERAS=1`` (unless already set), so that a
user's ``tf.keras`` is the same Keras 2 when lipdp is imported before
``tf.keras`` is first touched; a Keras 3 object handed to lipdp anyway is
refused by :func:`check_keras2` with what to do instead.

The Keras internals lipdp reads (the layer graph of a functional model, the
layers nested in a layer, whether a layer takes ``training``, the compiled
metrics, ``steps_per_execution``) are read here only, so a port to Keras 3
changes this module and the few calls into it.
"""

import os
import typing
from importlib import metadata


def _installed_tensorflow():
    """``(major, minor)`` of the installed TensorFlow distribution, read without importing it."""
    for name in ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"):
        try:
            return tuple(int(part) for part in metadata.version(name).split(".")[:2])
        except metadata.PackageNotFoundError:
            continue
    return None


# Before TensorFlow is imported: it reads the variable at import (for `from tensorflow.keras import ...`, as
# deel-lip does) and when tf.keras is first used.
if (_installed_tensorflow() or (0, 0)) >= (2, 16):
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

from lipdp.errors import ModelNotSupportedError  # noqa: E402

#: ``(major, minor)`` of the imported TensorFlow.
TF_VERSION = tuple(int(part) for part in tf.__version__.split(".")[:2])

if TF_VERSION >= (2, 16):
    import tf_keras as keras
else:
    keras = tf.keras


class LayerCall(typing.NamedTuple):
    """One call of a layer in a functional model's graph: the layer, and the ids of the tensors it reads and writes.

    The ids name tensors of the graph: a tensor read by several calls has one id.
    """

    layer: object
    input_ids: list
    output_ids: list
    outputs: list  # the symbolic output tensors
    is_input: bool


def is_graph_model(model):
    """Whether ``model`` is a functional or ``Sequential`` model with a layer graph (an input shape)."""
    return bool(getattr(model, "_is_graph_network", False)) and model.inputs is not None


def layer_calls(model):
    """Every layer call of a graph model, inputs first (Keras counts depth from the outputs)."""
    depths = sorted(model._nodes_by_depth, reverse=True)
    return [
        LayerCall(
            node.layer,
            list(node.flat_input_ids),
            list(node.flat_output_ids),
            tf.nest.flatten(node.outputs),
            node.is_input,
        )
        for depth in depths
        for node in model._nodes_by_depth[depth]
    ]


def leaf_layer_calls(model):
    """``[(layer, call)]`` of every layer call, nested graph models expanded into their own calls."""
    calls = []
    for call in layer_calls(model):
        if call.is_input:
            continue
        if isinstance(call.layer, keras.Model) and is_graph_model(call.layer):
            calls.extend(leaf_layer_calls(call.layer))
        else:
            calls.append((call.layer, call))
    return calls


def run_layer_by_layer(model, inputs, call_layer):
    """``model(inputs)``, layer call by layer call: ``call_layer(layer, args, kwargs)`` gives each call's outputs.

    Walks the nodes of the model's layer graph (Sequential or functional)
    from the inputs to the outputs, deepest first as Keras does; a nested
    functional model is walked too, with the arguments of its call.
    """
    values = {}  # id of a symbolic (Keras) tensor of the graph -> its value in this pass
    for reference, value in zip(model.inputs, model._flatten_to_reference_inputs(inputs)):
        values[id(reference)] = model._conform_to_reference_input(value, ref_input=reference)
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            symbolic = {id(t) for t in node.keras_inputs}
            args, kwargs = tf.nest.map_structure(
                lambda t: values[id(t)] if id(t) in symbolic else t, (node.call_args, node.call_kwargs)
            )
            if is_graph_model(node.layer) and isinstance(node.layer, keras.Model):
                outputs = run_layer_by_layer(node.layer, args[0], call_layer)
            else:
                outputs = call_layer(node.layer, args, kwargs)
            values.update(zip(map(id, tf.nest.flatten(node.outputs)), tf.nest.flatten(outputs)))
    return tf.nest.map_structure(lambda t: values[id(t)], model._nested_outputs)


def nested_layers(layer, include_self=False):
    """``layer``'s layers at every depth of nesting (sub-layers of custom layers and wrappers included)."""
    return list(layer._flatten_layers(include_self=include_self))


def random_generators(layer):
    """The ``tf.random.Generator`` objects a layer holds at any depth: its own, and Keras' random layers' ones."""
    found = list(layer._flatten(predicate=lambda item: isinstance(item, tf.random.Generator)))
    for inner in nested_layers(layer, include_self=True):
        generator = getattr(getattr(inner, "_random_generator", None), "_generator", None)
        if isinstance(generator, tf.random.Generator) and not any(generator is g for g in found):
            found.append(generator)
    return found


def expects_training_argument(layer):
    """Whether ``layer.call`` takes a ``training`` argument."""
    return bool(getattr(layer, "_expects_training_arg", False))


def update_compiled_metrics(model, y, y_pred):
    """Updates the metrics given to ``compile``."""
    model.compiled_metrics.update_state(y, y_pred)


def compiled_user_metrics(model):
    """The metrics given to ``compile``, as given (``None`` before ``compile``)."""
    return getattr(getattr(model, "compiled_metrics", None), "_user_metrics", None)


def steps_per_execution(model):
    """The ``steps_per_execution`` given to ``compile`` (1 when not compiled)."""
    variable = getattr(model, "_steps_per_execution", None)
    return 1 if variable is None else int(variable.numpy())


def check_keras2(objects, what):
    """Refuses Keras 3 objects (a layer, a model, an optimizer, a loss) handed to lipdp, which runs on Keras 2."""
    for item in objects:
        module = type(item).__module__
        if module.split(".")[0] == "keras" and keras.__name__.split(".")[0] != "keras":
            raise ModelNotSupportedError(
                f"{what} {item!r} is a Keras 3 object ({type(item).__module__}.{type(item).__name__}); lipdp "
                f"runs on the Keras 2 API ({keras.__name__}): build models with lipdp.keras (or tf_keras), or "
                "import lipdp before tensorflow's tf.keras is first used (or set TF_USE_LEGACY_KERAS=1), so that "
                "tf.keras is Keras 2"
            )
