"""Fast per-example gradient norms (no per-example loop) for the clipping rules of :mod:`lipdp.clipping`.

Fast per-example norms
----------------------
No loop over examples and no per-example gradient for layers with a fast rule
(Goodfellow 2015, Lee & Kifer 2020, "ghost norm" of Li et al. 2022). One
forward pass records, for each such layer, its pre-activation output ``z``;
one backward pass of the summed loss gives ``dL/dz`` (per example, since the
losses are per example); each layer turns its input and ``dL/dz`` into the
per-example squared norm of its variables' gradients:

* ``Dense`` / :class:`~lipdp.layers.LipschitzDense` (input ``(B, ..., d_in)``):
  example ``i``'s input rows ``H_i`` (``P x d_in``, ``P`` positions: the
  middle axes, 1 for a vector) and cotangents ``Z_i`` (``P x d_out``); the
  kernel gradient ``H_i^T Z_i`` has squared norm ``||h_i||^2 ||z_i||^2`` for
  one position, the Gram form ``<H_i H_i^T, Z_i Z_i^T>`` or the formed
  product for several (the cheaper); the bias gradient is ``sum_p z_ip``.
* ``EinsumDense``: the same per block of the kernel, after the equation's
  subscripts are sorted into positions, contracted and produced axes, and
  blocks (subscripts in input, kernel and output); bias: the cotangent summed
  over the output axes that the bias is broadcast over.
* ``Conv2D`` / :class:`~lipdp.layers.LipschitzConv2D`: im2col patches
  ``A_i`` (shape ``P x kh kw c_in``; ``tf.image.extract_patches``, or an
  identity-kernel convolution for shallow patches, see ``_patches``) and
  cotangents ``Z_i`` (``P x c_out``). Either the per-example kernel gradient
  ``A_i^T Z_i`` is formed (``P D C`` flops, ``D C`` floats per example) or the
  Gram form ``<A_i A_i^T, Z_i Z_i^T>`` (``P^2 (D + C)`` flops, ``P^2``
  floats); the cheaper is chosen, ``D = kh kw c_in``, ``C = c_out``.
* ``LayerNormalization``: ``gamma`` and ``beta`` get, per example, the sums of
  ``xhat * z`` and of ``z`` over the axes that are not normalised (``xhat``
  the normalised input, recomputed from the input).
* ``Embedding``: example ``i``'s gradient has row ``v`` equal to the sum of
  its cotangents at the positions of index ``v``; its squared norm is
  ``sum_{p, q: idx_p = idx_q} <z_ip, z_iq>``, computed by summing the
  cotangents of each distinct (example, index) pair.

These rules and the functional-graph walk that records the layers' inputs
(:func:`lipdp.backend.run_layer_by_layer`) are lipdp's own.

Any other layer with trainable variables -- or a layer called more than once
(shared weights: per-call norms do not add up) -- falls back to per-example
gradients of *that layer only*: its recorded outputs are watched, and
``tf.vectorized_map`` over examples computes the vector-Jacobian product of
the layer with each example's cotangent. A warning names the layer once.
Layers without trainable variables need nothing. The clipped sum of a
fallback layer's variables is formed from these same per-example gradients
(``sum_i w_i g_i``), not from the forward pass: a layer with randomness of
its own (dropout inside ``MultiHeadAttention``) draws new masks when it is
run again per example, and only the gradients whose norms were measured are
guaranteed to be clipped.

The clipped sum ``sum_i w_i g_i`` then needs no second backward pass
through the network for the linear layers (``Dense``, ``EinsumDense``,
``Conv2D`` and their lipdp versions): their variables' gradient is
``J_theta(z)^T (w * dL/dz)``, the layer's own weight gradient at its recorded
input with the weighted cotangents (the "book-keeping" of Bu et al. 2023;
one weight-gradient product per layer, as a non-private step computes).
Only the variables of other fast layers (``Embedding``,
``LayerNormalization``) take a second, weighted backward pass of
``sum_i stop_gradient(w_i) loss_i`` through the *same* forward pass. That
relies on the backward pass being linear in the cotangent, which holds for
ordinary autodiff; layers with custom gradients that are not
(``lipdp.layers.ClipGradient``) are refused, as are layers that mix
examples (``BatchNormalization``).
"""

import contextlib
import functools
import logging
import typing

import tensorflow as tf

from lipdp import backend, tf_workarounds
from lipdp.backend import keras
from lipdp.clipping.layer_rules import has_fast_rule, make_layer_registry, pre_activation
from lipdp.errors import ModelNotSupportedError
from lipdp.layers import ClipGradient, LipschitzConv2D
from lipdp.losses import LipschitzLoss
from lipdp.sensitivity import precision_problems, raise_problems

logger = logging.getLogger(__name__)

_warned_fallback = set()

# Python control flow here depends only on the model's structure, never on tensor values: AutoGraph
# would only add source conversion time to the first trace.
no_autograph = tf.autograph.experimental.do_not_convert


# -- validation --------------------------------------------------------------
def _is_batch_normalization(layer):
    return any("BatchNormalization" in cls.__name__ for cls in type(layer).__mro__)


def per_example_loss(model):
    """The compiled loss, whose ``call`` gives per-example values: a ``keras.losses.Loss`` instance."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, (LipschitzLoss, keras.losses.Loss)):
        return loss
    raise ModelNotSupportedError(
        f"clipped DP training needs the loss as a keras.losses.Loss instance (its per-example values come "
        f"from loss.call), e.g. keras.losses.CategoricalCrossentropy(from_logits=True); got {loss!r}"
    )


def _has_strided_pointwise_kernel_bug(layer):
    """A plain 1x1 ``Conv2D`` with unequal strides (``LipschitzConv2D`` computes it another way)."""
    return (
        isinstance(layer, keras.layers.Conv2D)
        and not isinstance(layer, LipschitzConv2D)
        and tf_workarounds.is_strided_pointwise(layer.kernel_size, layer.strides)
    )


def validate(model):
    """Raises :class:`ModelNotSupportedError` naming every reason the model cannot be trained with clipping."""
    if not backend.is_graph_model(model):
        raise ModelNotSupportedError(
            "the model has no layer graph yet: give it an input shape (keras.Input(...) as first layer)"
        )
    raise_problems(_problems(model))


def _problems(model):
    problems = list(_structural_problems(model))
    if not problems:  # the tied-weights check runs the model, which only a model without them may do
        try:
            _check_calls_read_their_own_variables(model)
        except ModelNotSupportedError as error:
            problems.append(str(error))
    return problems


def _structural_problems(model):
    if len(model.outputs) != 1:
        yield f"the model has {len(model.outputs)} outputs; exactly one is supported"
    yield from precision_problems(model)
    try:
        per_example_loss(model)
    except ModelNotSupportedError as error:
        yield str(error)
    calls = backend.leaf_layer_calls(model)
    owners = {}
    for layer, _ in calls:
        if _is_batch_normalization(layer):
            yield (
                f"layer {layer.name!r} ({type(layer).__name__}) normalises with batch statistics, so one "
                "example's gradient depends on the others: remove it or use LayerNormalization / GroupNormalization"
            )
        if _has_strided_pointwise_kernel_bug(layer):
            yield (
                f"layer {layer.name!r} is a 1x1 Conv2D with strides {tuple(layer.strides)}: TensorFlow's "
                "oneDNN Conv2DBackpropFilter (2.15, 2.21) corrupts memory for it on a batch of one, which Poisson "
                "sampling and micro-batches produce; use lipdp.layers.LipschitzConv2D (which avoids that kernel), "
                "equal strides, or a subsampling (e.g. a Lambda x[:, ::sh, ::sw]) then an unstrided 1x1 Conv2D"
            )
        if isinstance(layer, ClipGradient):
            yield (
                f"layer {layer.name!r} clips cotangents in its custom gradient, which is not linear in the "
                "cotangent: the weighted second backward pass of clipped training would be wrong; remove it"
            )
        for variable in layer.trainable_variables:
            owner = owners.setdefault(variable.ref(), layer)
            if owner is not layer:
                yield (
                    f"variable {variable.name} is shared by layers {owner.name!r} and {layer.name!r}; "
                    "per-example norms are computed per layer"
                )
    missing = [v.name for v in model.trainable_variables if v.ref() not in owners]
    if missing:
        yield f"trainable variable(s) {missing} are not used by any layer of the graph"
    if not model.trainable_variables:
        yield "the model has no trainable variables"


def _check_calls_read_their_own_variables(model):
    """Refuses a layer call that reads a trainable variable of another layer (tied weights, a closure).

    Each rule measures the gradient through its own layer's call; a variable
    read elsewhere too gets more gradient than that, so its norm would be
    under-stated. One eager pass on a zero example records what each call reads.
    """
    problems = []

    def call_layer(layer, args, kwargs):
        with tf.GradientTape() as tape:
            outputs = layer(*args, **kwargs)
        own = {v.name for v in layer.trainable_variables}  # names: under a strategy the tape sees the replicas'
        foreign = [v.name for v in tape.watched_variables() if v.trainable and v.name not in own]
        if foreign:
            problems.append(f"layer {layer.name!r} ({type(layer).__name__}) reads {foreign}")
        return outputs

    inputs = [tf.zeros([1] + [1 if d is None else d for d in t.shape[1:]], t.dtype) for t in model.inputs]
    backend.run_layer_by_layer(model, inputs if len(inputs) > 1 else inputs[0], call_layer)
    if problems:
        raise ModelNotSupportedError(
            "per-example norms are computed per layer, but variables are read by other layers too (tied weights "
            "or a closure): " + "; ".join(problems) + "; give each layer its own variables"
        )


def _warn_fallback(layer, reason):
    key = (id(layer), layer.name)
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        logger.warning(
            "lipdp clipping: layer %r (%s) %s; its per-example gradients are computed with "
            "tf.vectorized_map (slower, more memory)",
            layer.name,
            type(layer).__name__,
            reason,
        )


# -- the fallback: per-example gradients of one layer ---------------------------
def _fallback_gradients(layer, calls, cotangents):
    """Per-example gradients of ``layer``'s variables, summed over its ``calls``: ``[(B, *shape)]``.

    ``calls``: ``[(args, kwargs, flat_outputs)]``; ``cotangents``: for each
    call, the gradients of the summed loss w.r.t. ``flat_outputs``. The layer
    is run again per example, so a layer with its own randomness (dropout
    inside ``MultiHeadAttention``) draws other masks than in the forward pass:
    these gradients are therefore both the ones whose norms are measured *and*
    the ones summed (see :meth:`lipdp.clipping.rules.ClippingRule.gradient_sums`), never the forward
    pass's.
    """
    variables = layer.trainable_variables
    structures, mapped = [], []
    for (args, kwargs, _), cots in zip(calls, cotangents):
        flat = tf.nest.flatten((args, kwargs))
        is_tensor = [tf.is_tensor(t) for t in flat]
        structures.append(((args, kwargs), flat, is_tensor))
        mapped.append(([t for t, keep in zip(flat, is_tensor) if keep], list(cots)))

    def one_example(elems):
        outputs, output_grads = [], []
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            for (structure, flat, is_tensor), (tensors, cots) in zip(structures, elems):
                tensors = iter(tensors)
                values = [next(tensors)[None] if keep else t for t, keep in zip(flat, is_tensor)]
                args, kwargs = tf.nest.pack_sequence_as(structure, values)
                outputs.extend(tf.nest.flatten(layer(*args, **kwargs)))
                output_grads.extend(c[None] for c in cots)
        grads = tape.gradient(
            outputs, variables, output_gradients=output_grads, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return [tf.convert_to_tensor(g) for g in grads]

    return tf.vectorized_map(one_example, mapped, fallback_to_while_loop=True)


def _squared_norms(per_example_grads):
    """``sum_v ||g_v,i||^2`` for per-example gradients ``[(B, *shape)]``."""
    return tf.add_n(
        [
            tf.reduce_sum(tf.square(tf.reshape(tf.cast(g, tf.float32), [tf.shape(g)[0], -1])), axis=1)
            for g in per_example_grads
        ]
    )


# -- forward pass with norms ---------------------------------------------------
def per_sample_losses(loss, y, y_pred):
    """Per-example losses from ``loss.call``; extra axes (sequences, pixels) are averaged, as Keras does."""
    values = tf.convert_to_tensor(loss.call(y, y_pred))
    if values.shape.rank == 0:
        raise ModelNotSupportedError(f"loss {loss!r}.call returns a scalar; a per-example loss is needed")
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


def _shared_layers(model):
    counts = {}
    for layer, _ in backend.leaf_layer_calls(model):
        if layer.trainable_variables:
            counts[id(layer)] = counts.get(id(layer), 0) + 1
    return {key for key, count in counts.items() if count > 1}


_LINEAR_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv2D)


class NormedForwardPass(typing.NamedTuple):
    """A forward pass with each example's gradient norm (see :func:`forward_with_norms`)."""

    y_pred: typing.Any
    losses: tf.Tensor  # per example
    norms: tf.Tensor  # whole-model l2 norm of each example's loss gradient
    per_example_grads: dict  # variable.ref() -> (B, *shape) gradients of fallback layers (the ones measured)
    linear_calls: list  # (layer, args, kwargs, dL/dz) of the linear fast layers, z before the activation

    def weighted_gradient_sums(self, weights):
        """``{variable.ref(): sum_i w_i g_i}`` for the variables of fallback and linear fast layers.

        Fallback layers: the weighted sum of their measured per-example
        gradients. Linear layers: the layer's weight gradient at its recorded
        (constant) input with cotangents ``w_i dL_i/dz_i``; rerunning the
        layer forward is dead code in a ``tf.function`` (the weight gradients
        of a matmul or convolution do not read its output), so the cost is
        one weight-gradient product per layer.
        """
        sums = {}
        for ref, per_example in self.per_example_grads.items():
            sums[ref] = tf.tensordot(tf.cast(weights, per_example.dtype), per_example, axes=1)
        for layer, args, kwargs, cotangent in self.linear_calls:
            scale = tf.reshape(tf.cast(weights, cotangent.dtype), [-1] + [1] * (cotangent.shape.rank - 1))
            args = tf.nest.map_structure(tf.stop_gradient, args)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(layer.trainable_variables)
                base = pre_activation(layer, args, kwargs)
            grads = tape.gradient(base, layer.trainable_variables, output_gradients=cotangent * scale)
            sums.update((v.ref(), g) for v, g in zip(layer.trainable_variables, grads))
        return sums


@no_autograph
def forward_with_norms(model, x, y, registry=None, outer_tape=None):
    """One forward pass and one backward pass to the layers: a :class:`NormedForwardPass`.

    Called under ``outer_tape`` (recording), the norm computation is kept off
    that tape, so a weighted loss can be differentiated through the same
    forward pass for the variables that
    :meth:`NormedForwardPass.weighted_gradient_sums` does not cover (see
    :func:`lipdp.clipping.rules.ClippingRule.gradient_sums`).
    """
    registry = registry if registry is not None else _default_registry()
    shared = _shared_layers(model)
    tape = tf.GradientTape(watch_accessed_variables=False)
    fast, fallback = [], {}

    def call_layer(layer, args, kwargs):
        if backend.expects_training_argument(layer) and "training" not in kwargs:
            kwargs = {**kwargs, "training": True}
        if not layer.trainable_variables:
            return layer(*args, **kwargs)
        if id(layer) not in shared and has_fast_rule(layer, registry, kwargs):
            base, outputs, squared_norms = registry[type(layer)](layer, args, kwargs, tape)
            fast.append((base, squared_norms, (layer, args, kwargs)))
            return outputs
        _warn_fallback(
            layer,
            "is called more than once (shared weights)" if id(layer) in shared else "has no fast per-example norm rule",
        )
        outputs = layer(*args, **kwargs)
        flat_outputs = tf.nest.flatten(outputs)
        tape.watch(flat_outputs)
        fallback.setdefault(id(layer), (layer, []))[1].append((args, kwargs, flat_outputs))
        return outputs

    loss = per_example_loss(model)
    with tape:
        y_pred = backend.run_layer_by_layer(model, x, call_layer)
        losses = per_sample_losses(loss, y, y_pred)
        total = tf.reduce_sum(losses)
    with outer_tape.stop_recording() if outer_tape is not None else contextlib.nullcontext():
        watched = [base for base, _, _ in fast] + [call[2] for _, calls in fallback.values() for call in calls]
        grads = tape.gradient(total, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        squared = [fn(g) for (_, fn, _), g in zip(fast, grads[: len(fast)])]
        linear_calls = [(*call, g) for (_, _, call), g in zip(fast, grads) if isinstance(call[0], _LINEAR_LAYERS)]
        position, fallback_grads = len(fast), {}
        for layer, calls in fallback.values():
            per_example = _fallback_gradients(layer, calls, grads[position : position + len(calls)])
            fallback_grads.update({v.ref(): g for v, g in zip(layer.trainable_variables, per_example)})
            squared.append(_squared_norms(per_example))
            position += len(calls)
        squared = [tf.cast(s, tf.float32) for s in squared]
        norms = tf.sqrt(tf.add_n(squared)) if squared else tf.zeros_like(losses)
        norms = tf.debugging.check_numerics(norms, "per-example gradient norms (NaN or Inf in the data?)")
    return NormedForwardPass(y_pred, losses, norms, fallback_grads, linear_calls)


@no_autograph
def per_example_gradient_norms(model, x, y, registry=None):
    """Whole-model l2 norm of each example's loss gradient (fast rules, fallback where needed)."""
    count = tf.shape(x)[0]  # an empty batch runs one stand-in example (oneDNN convolutions break on none)
    x, y = tf_workarounds.with_stand_in_for_empty_batch(x), tf_workarounds.with_stand_in_for_empty_batch(y)
    return forward_with_norms(model, x, y, registry=registry).norms[:count]


@functools.lru_cache(maxsize=None)
def _default_registry():
    return make_layer_registry()
