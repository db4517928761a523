"""Fast per-example gradient norms (no per-example loop) for the clipping rules of :mod:`lipdp.clipping`.

Fast per-example norms
----------------------
No loop over examples and no per-example gradient for layers with a fast rule
(Goodfellow 2015, Lee & Kifer 2020, "ghost norm" of Li et al. 2022). One
forward pass records, for each such layer, its pre-activation output ``z``;
one backward pass of the summed loss gives ``dL/dz`` (per example, since the
losses are per example); each layer turns its input and ``dL/dz`` into the
per-example squared norm of its variables' gradients:

* ``Dense`` / :class:`~lipdp.layers.LipschitzDense` / ``EinsumDense`` /
  ``Embedding`` / ``LayerNormalization``: tensorflow_privacy's registry
  functions (``||h_i||^2 ||z_i||^2`` for one position, the Gram form
  ``<H_i H_i^T, Z_i Z_i^T>`` for sequences, plus the bias term
  ``||sum_p z_ip||^2``).
* ``Conv2D`` / :class:`~lipdp.layers.LipschitzConv2D` (here): im2col patches
  ``A_i`` (shape ``P x kh kw c_in``; ``tf.image.extract_patches``, or an
  identity-kernel convolution for shallow patches, see ``_patches``) and
  cotangents ``Z_i`` (``P x c_out``). Either the per-example kernel gradient
  ``A_i^T Z_i`` is formed (``P D C`` flops, ``D C`` floats per example) or the
  Gram form ``<A_i A_i^T, Z_i Z_i^T>`` (``P^2 (D + C)`` flops, ``P^2``
  floats); the cheaper is chosen, ``D = kh kw c_in``, ``C = c_out``.

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

from lipdp.errors import ModelNotSupportedError
from lipdp.layers import ClipGradient, LipschitzConv2D, LipschitzDense
from lipdp.layers.base import with_stand_in_for_empty_batch
from lipdp.losses import LipschitzLoss
from lipdp.sensitivity import check_precision

logger = logging.getLogger(__name__)

_warned_fallback = set()

# Python control flow here depends only on the model's structure, never on tensor values: AutoGraph
# would only add ~10 s of source conversion (this module and tensorflow_privacy's) to the first trace.
no_autograph = tf.autograph.experimental.do_not_convert


# -- validation --------------------------------------------------------------
def _is_batch_normalization(layer):
    return any("BatchNormalization" in cls.__name__ for cls in type(layer).__mro__)


def _graph_layers(model):
    """Every layer call in the model's graph (nested functional models expanded): ``[(layer, node)]``."""
    calls = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            if _has_graph(node.layer):
                calls.extend(_graph_layers(node.layer))
            else:
                calls.append((node.layer, node))
    return calls


def _has_graph(layer):
    return isinstance(layer, tf.keras.Model) and getattr(layer, "_is_graph_network", False)


def per_example_loss(model):
    """The compiled loss, whose ``call`` gives per-example values: a ``tf.keras.losses.Loss`` instance."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, (LipschitzLoss, tf.keras.losses.Loss)):
        return loss
    raise ModelNotSupportedError(
        f"clipped DP training needs the loss as a tf.keras.losses.Loss instance (its per-example values come "
        f"from loss.call), e.g. tf.keras.losses.CategoricalCrossentropy(from_logits=True); got {loss!r}"
    )


def _has_strided_pointwise_kernel_bug(layer):
    """A plain 1x1 ``Conv2D`` with unequal strides (``LipschitzConv2D`` computes it another way)."""
    return (
        isinstance(layer, tf.keras.layers.Conv2D)
        and not isinstance(layer, LipschitzConv2D)
        and tuple(layer.kernel_size) == (1, 1)
        and layer.strides[0] != layer.strides[1]
    )


def validate(model):
    """Raises :class:`ModelNotSupportedError` if the model cannot be trained with clipping."""
    if not getattr(model, "_is_graph_network", False) or model.inputs is None:
        raise ModelNotSupportedError(
            "the model has no layer graph yet: give it an input shape (tf.keras.Input(...) as first layer)"
        )
    if len(model.outputs) != 1:
        raise ModelNotSupportedError(f"the model has {len(model.outputs)} outputs; exactly one is supported")
    check_precision(model)
    per_example_loss(model)
    calls = _graph_layers(model)
    owners = {}
    for layer, _ in calls:
        if _is_batch_normalization(layer):
            raise ModelNotSupportedError(
                f"layer {layer.name!r} ({type(layer).__name__}) normalises with batch statistics, so one "
                "example's gradient depends on the others: remove it or use LayerNormalization / GroupNormalization"
            )
        if _has_strided_pointwise_kernel_bug(layer):
            raise ModelNotSupportedError(
                f"layer {layer.name!r} is a 1x1 Conv2D with strides {tuple(layer.strides)}: TensorFlow 2.15's "
                "oneDNN Conv2DBackpropFilter corrupts memory for it on a batch of one, which Poisson sampling "
                "and micro-batches produce; use lipdp.layers.LipschitzConv2D (which avoids that kernel), equal "
                "strides, or a subsampling (e.g. a Lambda x[:, ::sh, ::sw]) then an unstrided 1x1 Conv2D"
            )
        if isinstance(layer, ClipGradient):
            raise ModelNotSupportedError(
                f"layer {layer.name!r} clips cotangents in its custom gradient, which is not linear in the "
                "cotangent: the weighted second backward pass of clipped training would be wrong; remove it"
            )
        for variable in layer.trainable_variables:
            owner = owners.setdefault(variable.ref(), layer)
            if owner is not layer:
                raise ModelNotSupportedError(
                    f"variable {variable.name} is shared by layers {owner.name!r} and {layer.name!r}; "
                    "per-example norms are computed per layer"
                )
    missing = [v.name for v in model.trainable_variables if v.ref() not in owners]
    if missing:
        raise ModelNotSupportedError(f"trainable variable(s) {missing} are not used by any layer of the graph")
    if not model.trainable_variables:
        raise ModelNotSupportedError("the model has no trainable variables")


# -- fast rules --------------------------------------------------------------
def _pre_activation(layer, args, kwargs):
    """The output of ``layer(*args, **kwargs)`` before its ``activation`` (if it has one)."""
    activation = getattr(layer, "activation", None)
    if activation is not None:
        layer.activation = None
    try:
        return layer(*args, **kwargs)
    finally:
        if activation is not None:
            layer.activation = activation


def _without_activation(layer, inputs, tape):
    """Pre-activation output (watched) and output of a layer with an ``activation`` attribute."""
    base = _pre_activation(layer, (inputs,), {})
    tape.watch(base)
    return base, (layer.activation(base) if layer.activation is not None else base)


#: Up to this patch depth ``kh kw c_in``, im2col runs as a convolution with an identity kernel: on CPU,
#: ``tf.image.extract_patches`` took 13 ms for a 3x3 patch of a one-channel 28x28 batch of 1,024 (the
#: identity convolution, 1.5 ms); at depth 144 (16 channels) it was the faster of the two.
CONV_PATCHES_MAX_DEPTH = 64


def _patches(inputs, layer, depth):
    """im2col of ``inputs`` for ``layer``: ``(B, H', W', kh kw c_in)``, the same entries either way.

    An identity-kernel convolution copies each entry exactly (one product by
    1, the other terms 0); the order of the patch entries does not matter to
    the norms (both forms sum over them).
    """
    kh, kw = layer.kernel_size
    strides, rates = [1, *layer.strides, 1], [1, *layer.dilation_rate, 1]
    if depth <= CONV_PATCHES_MAX_DEPTH:
        identity = tf.reshape(tf.eye(depth, dtype=inputs.dtype), [kh, kw, int(inputs.shape[-1]), depth])
        return tf.nn.conv2d(inputs, identity, strides, layer.padding.upper(), dilations=rates)
    return tf.image.extract_patches(inputs, [1, kh, kw, 1], strides, rates, layer.padding.upper())


def conv2d_squared_norms(inputs, grads, layer, method="auto"):
    """Per-example squared gradient norm of a channels-last ``Conv2D`` (kernel and bias).

    Args:
        inputs: the layer input, ``(B, H, W, c_in)``.
        grads: gradient of the summed loss w.r.t. the pre-activation output,
            ``(B, H', W', c_out)``.
        layer: the ``Conv2D`` (kernel size, strides, dilation, padding).
        method: ``"direct"`` (form ``A_i^T Z_i``), ``"gram"``
            (``<A_i A_i^T, Z_i Z_i^T>``) or ``"auto"`` (fewer flops).
    """
    kh, kw = layer.kernel_size
    batch = tf.shape(inputs)[0]
    depth, filters = kh * kw * int(inputs.shape[-1]), int(grads.shape[-1])
    a = tf.reshape(_patches(inputs, layer, depth), [batch, -1, depth])
    z = tf.reshape(grads, [batch, -1, filters])
    if method == "auto":
        positions = a.shape[1]  # None for a dynamic image size: then "direct", whose memory does not grow with it
        method = "gram" if positions is not None and positions * (depth + filters) < depth * filters else "direct"
    if method == "gram":
        squared = tf.reduce_sum(tf.matmul(a, a, transpose_b=True) * tf.matmul(z, z, transpose_b=True), axis=[1, 2])
    elif method == "direct":
        squared = tf.reduce_sum(tf.square(tf.matmul(a, z, transpose_a=True)), axis=[1, 2])
    else:
        raise ValueError(f"method={method!r} is not one of ('auto', 'gram', 'direct')")
    if layer.use_bias:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(z, axis=1)), axis=1)
    return squared


def conv2d_layer_computation(layer, input_args, input_kwargs, tape, num_microbatches=None, method="auto"):
    """tensorflow_privacy registry function for ``Conv2D`` (see :func:`conv2d_squared_norms`)."""
    if input_kwargs or len(input_args) != 1 or num_microbatches is not None:
        raise ValueError("Conv2D fast norms take one input, no keyword arguments and no microbatches")
    inputs = input_args[0]
    base, outputs = _without_activation(layer, inputs, tape)
    return base, outputs, functools.partial(conv2d_squared_norms, inputs, layer=layer, method=method)


def _conv2d_supported(layer):
    return layer.data_format == "channels_last" and layer.groups == 1 and layer.padding in ("same", "valid")


def _layer_norm_supported(layer):
    return layer.center and layer.scale


def _embedding_supported(layer):
    return not getattr(layer, "sparse", False) and not getattr(layer, "_use_one_hot_matmul", False)


def make_layer_registry(conv_method="auto"):
    """tensorflow_privacy's default registry (Dense, Embedding) plus EinsumDense, LayerNormalization,
    Conv2D and the lipdp layers.

    Classes match exactly (a subclass may override ``call``), which is why
    ``LipschitzDense`` / ``LipschitzConv2D`` are registered by name.
    ``conv_method`` forces the Conv2D form (``"auto"``, ``"gram"``, ``"direct"``).
    """
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions.dense import dense_layer_computation
    from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions.einsum_dense import (
        einsum_layer_computation,
    )
    from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions.layer_normalization import (
        layer_normalization_computation,
    )

    registry = layer_registry.make_default_layer_registry()
    conv = functools.partial(conv2d_layer_computation, method=conv_method)
    registry.insert(LipschitzDense, dense_layer_computation)
    registry.insert(tf.keras.layers.EinsumDense, einsum_layer_computation)
    registry.insert(tf.keras.layers.LayerNormalization, layer_normalization_computation)
    registry.insert(tf.keras.layers.Conv2D, conv)
    registry.insert(LipschitzConv2D, conv)
    return registry


_CONFIG_CHECKS = {
    "Conv2D": _conv2d_supported,
    "LipschitzConv2D": _conv2d_supported,
    "LayerNormalization": _layer_norm_supported,
    "Embedding": _embedding_supported,
}


def has_fast_rule(layer, registry, kwargs=None):
    """Whether ``layer`` (called with ``kwargs``) gets its norms without per-example gradients."""
    if not registry.is_elem(layer):
        return False
    if kwargs and not isinstance(layer, tf.keras.layers.LayerNormalization):
        return False  # the registry functions refuse keyword arguments
    check = _CONFIG_CHECKS.get(type(layer).__name__)
    return check is None or bool(check(layer))


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
    for layer, _ in _graph_layers(model):
        if layer.trainable_variables:
            counts[id(layer)] = counts.get(id(layer), 0) + 1
    return {key for key, count in counts.items() if count > 1}


_LINEAR_LAYERS = (tf.keras.layers.Dense, tf.keras.layers.EinsumDense, tf.keras.layers.Conv2D)


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
                base = _pre_activation(layer, args, kwargs)
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
    from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils

    registry = registry if registry is not None else _default_registry()
    shared = _shared_layers(model)
    tape = tf.GradientTape(watch_accessed_variables=False)
    fast, fallback = [], {}

    def generator_fn(layer, args, kwargs):
        if getattr(layer, "_expects_training_arg", False) and "training" not in kwargs:
            kwargs = {**kwargs, "training": True}
        if not layer.trainable_variables:
            return layer(*args, **kwargs), None
        if id(layer) not in shared and has_fast_rule(layer, registry, kwargs):
            base, outputs, sqr_norm_fn = registry.lookup(layer)(layer, args, kwargs, tape, None)
            fast.append((base, sqr_norm_fn, (layer, args, kwargs)))
            return outputs, None
        _warn_fallback(
            layer,
            "is called more than once (shared weights)" if id(layer) in shared else "has no fast per-example norm rule",
        )
        outputs = layer(*args, **kwargs)
        flat_outputs = tf.nest.flatten(outputs)
        tape.watch(flat_outputs)
        fallback.setdefault(id(layer), (layer, []))[1].append((args, kwargs, flat_outputs))
        return outputs, None

    loss = per_example_loss(model)
    with tape:
        y_pred, _ = gradient_clipping_utils.model_forward_pass(model, x, generator_fn=generator_fn)
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
    x, y = with_stand_in_for_empty_batch(x), with_stand_in_for_empty_batch(y)
    return forward_with_norms(model, x, y, registry=registry).norms[:count]


@functools.lru_cache(maxsize=None)
def _default_registry():
    return make_layer_registry()
