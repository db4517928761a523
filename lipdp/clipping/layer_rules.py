"""Per-layer fast rules: each example's squared gradient norm of one layer from its input and cotangent.

Ghost norms (Lee & Kifer 2020) for ``Dense``, ``EinsumDense``, ``Conv2D``
(either the Gram form or the explicit per-example gradient, whichever is
cheaper; the Gram form in float64), ``LayerNormalization`` and
``Embedding``, and the registry :func:`make_layer_registry` that maps a layer
class to its rule (:mod:`lipdp.clipping.fast_norms` uses it).
"""

import functools
import re
import string

import tensorflow as tf

from lipdp.backend import keras
from lipdp.layers import LipschitzConv2D, LipschitzDense


def pre_activation(layer, args, kwargs):
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
        base = pre_activation(layer, args, kwargs)
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
