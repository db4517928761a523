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
import re
import string
import typing

import tensorflow as tf

from lipdp import backend
from lipdp.backend import keras
from lipdp.errors import ModelNotSupportedError
from lipdp.layers import ClipGradient, LipschitzConv2D, LipschitzDense
from lipdp.layers.base import with_stand_in_for_empty_batch
from lipdp.losses import LipschitzLoss
from lipdp.sensitivity import check_precision

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
        and tuple(layer.kernel_size) == (1, 1)
        and layer.strides[0] != layer.strides[1]
    )


def validate(model):
    """Raises :class:`ModelNotSupportedError` if the model cannot be trained with clipping."""
    if not backend.is_graph_model(model):
        raise ModelNotSupportedError(
            "the model has no layer graph yet: give it an input shape (keras.Input(...) as first layer)"
        )
    if len(model.outputs) != 1:
        raise ModelNotSupportedError(f"the model has {len(model.outputs)} outputs; exactly one is supported")
    check_precision(model)
    per_example_loss(model)
    calls = backend.leaf_layer_calls(model)
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
    _check_calls_read_their_own_variables(model)
    missing = [v.name for v in model.trainable_variables if v.ref() not in owners]
    if missing:
        raise ModelNotSupportedError(f"trainable variable(s) {missing} are not used by any layer of the graph")
    if not model.trainable_variables:
        raise ModelNotSupportedError("the model has no trainable variables")


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


def _size(tensor, start, stop):
    """Number of entries of ``tensor.shape[start:stop]``: a Python int where static, else a scalar tensor."""
    dims = tensor.shape[start:stop]
    return dims.num_elements() if dims.is_fully_defined() else tf.reduce_prod(tf.shape(tensor)[start:stop])


def _three_axes(tensor, lead, trail):
    """``tensor`` reshaped to ``(N, P, F)``, merging its first ``lead`` axes, its last ``trail`` and those between."""
    rank = tensor.shape.rank
    sizes = [_size(tensor, 0, lead), _size(tensor, lead, rank - trail), _size(tensor, rank - trail, rank)]
    return tf.reshape(tensor, sizes)


def _cheaper_form(positions, depth, filters):
    """``"gram"`` where its ``P^2 (D + C)`` flops beat the direct form's ``P D C``, else ``"direct"``.

    A dynamic ``P`` (``None``) gets ``"direct"``, whose memory does not grow with ``P``.
    """
    return "gram" if positions is not None and positions * (depth + filters) < depth * filters else "direct"


def _kernel_squared_norms(a, z, method):
    """``||A_n^T Z_n||_F^2`` for ``a`` ``(N, P, D)``, ``z`` ``(N, P, C)``: the per-example kernel gradient's norm.

    ``"direct"`` forms ``A_n^T Z_n``; ``"gram"`` uses
    ``||A^T Z||_F^2 = tr(Z^T A A^T Z) = <A A^T, Z Z^T>``; ``"auto"``, the one
    with fewer flops (for ``P = 1``, ``||a||^2 ||z||^2``).
    """
    if method == "auto":
        method = _cheaper_form(a.shape[1], a.shape[2], z.shape[2])
    if method == "gram":  # in float64: its terms cancel where positions do, which float32 would round away
        a, z, dtype = tf.cast(a, tf.float64), tf.cast(z, tf.float64), z.dtype
        squared = tf.reduce_sum(tf.matmul(a, a, transpose_b=True) * tf.matmul(z, z, transpose_b=True), axis=[1, 2])
        return tf.cast(tf.maximum(squared, 0.0), dtype)
    if method == "direct":
        return tf.reduce_sum(tf.square(tf.matmul(a, z, transpose_a=True)), axis=[1, 2])
    raise ValueError(f"method={method!r} is not one of ('auto', 'gram', 'direct')")


def _squared_sum(per_example):
    """``||g_i||^2`` for ``per_example`` ``(B, ...)``."""
    return tf.reduce_sum(tf.square(per_example), axis=list(range(1, per_example.shape.rank)))


def _bias_squared_norms(z):
    """``||sum_p z_np||^2`` for ``z`` ``(N, P, C)``: a bias added at every position gets the summed cotangent."""
    return tf.reduce_sum(tf.square(tf.reduce_sum(z, axis=1)), axis=1)


def dense_squared_norms(inputs, grads, layer, method="auto"):
    """Per-example squared gradient norm of a ``Dense`` (kernel and bias) applied to ``(B, ..., d_in)``.

    Example ``i``'s input rows ``H_i`` (``P x d_in``, ``P`` the product of
    the middle axes, 1 for a rank-2 input) and cotangents ``Z_i``
    (``P x d_out``): kernel gradient ``H_i^T Z_i``, bias gradient
    ``sum_p z_ip``.
    """
    z = _three_axes(grads, 1, 1)
    squared = _kernel_squared_norms(_three_axes(tf.cast(inputs, grads.dtype), 1, 1), z, method)
    return squared + _bias_squared_norms(z) if layer.use_bias else squared


def _einsum_specs(layer):
    """The input, kernel and output subscripts of an ``EinsumDense`` equation, an ellipsis spelled out."""
    inputs, kernel, outputs = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)", layer.equation).groups()
    elided = len(layer.full_output_shape) - len(outputs.replace("...", ""))
    spare = "".join(c for c in string.ascii_letters if c not in layer.equation)[:elided]
    return inputs.replace("...", spare), kernel, outputs.replace("...", spare)


def einsum_dense_squared_norms(inputs, grads, layer, method="auto"):
    """Per-example squared gradient norm of an ``EinsumDense`` (kernel and bias).

    The subscripts other than the batch's ``b`` are: shared ``S`` (input,
    kernel and output: the kernel is one block per ``s``), positions ``P``
    (input and output), contracted ``D`` (input and kernel), ``C`` (kernel
    and output); input-only subscripts are summed out of the input. The
    kernel gradient of block ``s`` is ``H_is^T Z_is`` (``H_is``:
    ``P x D``, ``Z_is``: ``P x C``), so the squared norm is
    ``sum_s ||H_is^T Z_is||^2``; the bias gradient is the cotangent summed
    over the output subscripts not in ``bias_axes``.
    """
    in_spec, kernel_spec, out_spec = _einsum_specs(layer)
    batch = in_spec[0]
    shared = "".join(c for c in kernel_spec if c in in_spec and c in out_spec)
    positions = "".join(c for c in out_spec[1:] if c in in_spec and c not in kernel_spec)
    contracted = "".join(c for c in kernel_spec if c in in_spec and c not in out_spec)
    produced = "".join(c for c in kernel_spec if c in out_spec and c not in in_spec)
    h = tf.einsum(f"{in_spec}->{batch}{shared}{positions}{contracted}", tf.cast(inputs, grads.dtype))
    z = tf.einsum(f"{out_spec}->{batch}{shared}{positions}{produced}", grads)
    lead = 1 + len(shared)
    blocks = _kernel_squared_norms(_three_axes(h, lead, len(contracted)), _three_axes(z, lead, len(produced)), method)
    squared = tf.reduce_sum(tf.reshape(blocks, [tf.shape(grads)[0], _size(h, 1, lead)]), axis=1)
    if layer.bias is None:
        return squared
    return squared + _squared_sum(tf.einsum(f"{out_spec}->{batch}{layer.bias_axes}", grads))


def layer_norm_normalised(inputs, layer):
    """``xhat = (x - mean) / sqrt(var + eps)`` over ``layer.axis``, as :func:`layer_norm_rule`'s forward uses it."""
    mean, variance = tf.nn.moments(inputs, layer.axis, keepdims=True)
    return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon)


def layer_norm_squared_norms(normalised, grads, layer):
    """Per-example squared gradient norm of a ``LayerNormalization`` (``gamma`` and ``beta``).

    ``y = gamma xhat + beta``, ``xhat`` the ``normalised`` input the forward
    pass used (:func:`layer_norm_rule`): example ``i``'s gradients are
    ``sum xhat_i * z_i`` (gamma) and ``sum z_i`` (beta), summed over the axes
    that are neither the batch's nor normalised.
    """
    other_axes = [a for a in range(1, grads.shape.rank) if a not in layer.axis]
    per_example = []
    if layer.scale:
        per_example.append(tf.reduce_sum(tf.cast(normalised, grads.dtype) * grads, axis=other_axes))
    if layer.center:
        per_example.append(tf.reduce_sum(grads, axis=other_axes))
    return tf.add_n([_squared_sum(g) for g in per_example])


def layer_norm_rule(layer, args, kwargs, tape):
    """The registry entry of ``LayerNormalization``: the layer's function computed here, from one ``xhat``.

    Keras normalises another way (a fused kernel, or ``x inv + (beta - mean
    inv)``); with inputs far from zero, float32 cancellation made its ``xhat``
    and a recomputed one differ by far more than the clip margin. Here the
    output and the norms share the same ``xhat``, so the norm is the one of
    the gradient this forward pass gives.
    """
    inputs = tf.cast(args[0], layer.compute_dtype)
    normalised = layer_norm_normalised(inputs, layer)
    shape = [1] * inputs.shape.rank
    for axis in layer.axis:
        shape[axis] = inputs.shape[axis]
    base = normalised
    if layer.scale:
        base = base * tf.reshape(tf.cast(layer.gamma, base.dtype), shape)
    if layer.center:
        base = base + tf.reshape(tf.cast(layer.beta, base.dtype), shape)
    tape.watch(base)
    return base, base, functools.partial(layer_norm_squared_norms, normalised, layer=layer)


def embedding_squared_norms(indices, grads, layer):
    """Per-example squared gradient norm of an ``Embedding`` table.

    Example ``i``'s gradient has row ``v`` equal to ``sum_{p: idx_ip = v} z_ip``,
    so its squared norm is ``sum_{p, q: idx_ip = idx_iq} <z_ip, z_iq>``. Rather
    than all pairs of positions, the cotangents of equal ``(example, index)``
    are summed (one segment each) and the segments' squared norms are added up.
    """
    batch = tf.shape(grads)[0]
    indices = tf.cast(indices, tf.int64)
    example = tf.reshape(tf.range(tf.cast(batch, tf.int64)), [-1] + [1] * (indices.shape.rank - 1))
    example = tf.broadcast_to(example, tf.shape(indices))
    keys, segment = tf.unique(tf.reshape(example * layer.input_dim + indices, [-1]))
    rows = tf.math.unsorted_segment_sum(tf.reshape(grads, [-1, grads.shape[-1]]), segment, tf.size(keys))
    return tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(rows), axis=1), keys // layer.input_dim, batch)


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
    depth = kh * kw * int(inputs.shape[-1])
    z = _three_axes(grads, 1, 1)
    squared = _kernel_squared_norms(_three_axes(_patches(inputs, layer, depth), 1, 1), z, method)
    return squared + _bias_squared_norms(z) if layer.use_bias else squared


def _conv2d_supported(layer):
    return layer.data_format == "channels_last" and layer.groups == 1 and layer.padding in ("same", "valid")


def _einsum_dense_supported(layer):
    in_spec, kernel_spec, out_spec = _einsum_specs(layer)
    return in_spec[0] == out_spec[0] and in_spec[0] not in kernel_spec  # the batch axis stays first


def _layer_norm_supported(layer):
    return 0 not in layer.axis  # normalising over the batch mixes examples


def _embedding_supported(layer):
    return not getattr(layer, "sparse", False) and not getattr(layer, "_use_one_hot_matmul", False)


def _fast_rule(squared_norms, **options):
    """A registry entry: ``rule(layer, args, kwargs, tape) -> (z, outputs, dL/dz -> per-example squared norms)``.

    ``z``, the layer's output before its activation, is watched on ``tape``;
    ``squared_norms(args[0], dL/dz, layer=layer, **options)`` gives the norms.
    """

    def rule(layer, args, kwargs, tape):
        base = _pre_activation(layer, args, kwargs)
        tape.watch(base)
        activation = getattr(layer, "activation", None)
        outputs = activation(base) if activation is not None else base
        return base, outputs, functools.partial(squared_norms, args[0], layer=layer, **options)

    return rule


def make_layer_registry(method="auto"):
    """lipdp's fast rules: ``{layer class: rule}`` for Dense, EinsumDense, Conv2D, LayerNormalization,
    Embedding and the lipdp layers.

    Classes match exactly (a subclass may override ``call``), which is why
    ``LipschitzDense`` / ``LipschitzConv2D`` are registered by name.
    ``method`` forces the form of the kernel rules (Dense, EinsumDense,
    Conv2D): ``"auto"``, ``"gram"`` or ``"direct"``.
    """
    dense = _fast_rule(dense_squared_norms, method=method)
    conv = _fast_rule(conv2d_squared_norms, method=method)
    return {
        keras.layers.Dense: dense,
        LipschitzDense: dense,
        keras.layers.EinsumDense: _fast_rule(einsum_dense_squared_norms, method=method),
        keras.layers.Conv2D: conv,
        LipschitzConv2D: conv,
        keras.layers.LayerNormalization: layer_norm_rule,
        keras.layers.Embedding: _fast_rule(embedding_squared_norms),
    }


_CONFIG_CHECKS = {
    "Conv2D": _conv2d_supported,
    "LipschitzConv2D": _conv2d_supported,
    "EinsumDense": _einsum_dense_supported,
    "LayerNormalization": _layer_norm_supported,
    "Embedding": _embedding_supported,
}


def has_fast_rule(layer, registry, kwargs=None):
    """Whether ``layer`` (called with ``kwargs``) gets its norms without per-example gradients."""
    if type(layer) not in registry:
        return False
    if kwargs and not isinstance(layer, keras.layers.LayerNormalization):
        return False  # the other rules' layers take their input alone
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
    x, y = with_stand_in_for_empty_batch(x), with_stand_in_for_empty_batch(y)
    return forward_with_norms(model, x, y, registry=registry).norms[:count]


@functools.lru_cache(maxsize=None)
def _default_registry():
    return make_layer_registry()
