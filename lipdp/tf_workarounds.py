"""Workarounds for TensorFlow CPU (oneDNN) convolution bugs, each with the versions seen to need it.

Both were reproduced on TensorFlow 2.15.1 and 2.21.0 (x86-64 CPU, oneDNN on,
December 2026) and are applied on every version: they cost a copy or a slice,
not a result.

* **Empty batch** (2.15.1, 2.21.0): ``tf.nn.convolution`` of a ``(0, H, W, C)``
  input returns it unchanged instead of ``(0, H', W', filters)``. Empty
  Poisson batches are valid steps (noise only), so convolutions run on one
  zero stand-in example (:func:`with_stand_in_for_empty_batch`) and drop
  what it gives (:func:`without_stand_in`, or weight it 0).
* **Strided 1x1 kernel** (2.15.1, 2.21.0): ``Conv2DBackpropFilter`` corrupts
  the heap (2.21.0: ``free(): invalid next size``; 2.15.1: the process dies) within
  50 filter-gradient steps for a 1x1 kernel with strides
  ``(1, 2)`` or ``(2, 1)`` on a batch of one (a Poisson batch or a
  micro-batch of one). :class:`lipdp.layers.LipschitzConv2D` computes such a
  convolution as :func:`subsampled_pointwise` (the same map); clipping
  models with a plain ``Conv2D`` of that kind are refused
  (:func:`is_strided_pointwise`).
"""

import tensorflow as tf


def with_stand_in_for_empty_batch(tensor):
    """``tensor`` with one all-zero example appended when its batch is empty, unchanged otherwise.

    Empty Poisson batches are valid steps (noise only), but oneDNN CPU
    convolutions return a ``(0, H, W, C)`` input unchanged (module docstring).
    Callers run the stand-in and drop what it gives (:func:`without_stand_in`, or weight it 0). No control flow, so
    per-example ``vectorized_map`` works. A concatenation, not a ``tf.pad``
    (which would copy nothing): oneDNN fuses a pad into a following VALID
    convolution, batch axis included, and the fused kernel has the same
    empty-batch bug.
    """
    tensor = tf.convert_to_tensor(tensor)
    missing = tf.maximum(1 - tf.shape(tensor)[0], 0)
    zeros = tf.zeros(tf.concat([[missing], tf.shape(tensor)[1:]], axis=0), tensor.dtype)
    return tf.concat([tensor, zeros], axis=0)


def without_stand_in(tensor, count):
    """The first ``count`` examples of ``tensor``: drops what a stand-in example gave.

    ``tf.slice``, not ``tensor[:count]``: slicing everything passes the
    tensor through, and the gradient of a slice is a zero padding, which does
    too; the gradient of a strided slice copied the whole tensor (13 % of a
    step of the ``configs/mnist_conv.yaml`` CNN at batch 1,024).
    """
    shape = tf.shape(tensor)
    size = tf.concat([[count], -tf.ones_like(shape[1:])], axis=0)
    result = tf.slice(tensor, tf.zeros_like(shape), size)
    if tensor.shape.rank is not None:  # the static example shape, lost through the dynamic size
        result.set_shape(tf.TensorShape([None]).concatenate(tensor.shape[1:]))
    return result


def is_strided_pointwise(kernel_size, strides):
    """A 1x1 kernel with unequal strides: the shape whose filter gradient corrupts the heap."""
    return tuple(kernel_size) == (1, 1) and strides[0] != strides[1]


def subsampled_pointwise(inputs, kernel, strides):
    """A strided 1x1 convolution as a subsampling then an unstrided 1x1 convolution (the same map).

    With a 1x1 window neither padding adds anything: output position
    ``(i, j)`` reads input ``(i sh, j sw)`` in both.
    """
    rows, cols = strides
    return tf.nn.convolution(inputs[:, ::rows, ::cols, :], kernel, strides=1, padding="VALID")
