"""Pooling layers with worst-case bounds.

With windows of size ``k`` and strides ``s``, one input pixel lies in at most
``overlap = ceil(kh/sh) * ceil(kw/sw)`` windows (1 when stride == pool size).
For a per-window map ``g`` with ``|g(w)| <= ||w||`` and ``g`` 1-Lipschitz,
``||out||^2 = sum_p g(w_p)^2 <= sum_p ||w_p||^2 <= overlap ||x||^2``, and the
same Cauchy-Schwarz argument bounds the cotangent: both scale by
``sqrt(overlap)``.
"""

import math

import tensorflow as tf

from lipdp.backend import keras
from lipdp.layers.base import DPLayer, as_bound, window_overlap

# Smoothing inside the square root of norm pooling: sqrt(s + eps) - sqrt(eps)
# is <= sqrt(s) and has gradient norm < 1, so it keeps both bounds exactly
# while staying differentiable at 0.
_NORM_EPS = 1e-12


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _same_padding(size, window, stride):
    total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
    return [total // 2, total - total // 2]


class _WindowedPooling(DPLayer, keras.layers.Layer):
    """Shared configuration of the 2-D pooling layers; output and cotangent scale by sqrt(overlap)."""

    def __init__(self, pool_size=2, strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.pool_size = _pair(pool_size)
        self.strides = _pair(strides) if strides is not None else self.pool_size
        self.padding = padding
        self.overlap = window_overlap(self.pool_size, self.strides)

    def lipschitz_constant(self):
        return as_bound(math.sqrt(self.overlap))

    def output_bound(self, input_bound):
        return self.lipschitz_constant() * input_bound

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides, "padding": self.padding}


@keras.utils.register_keras_serializable("lipdp")
class L2NormPooling2D(_WindowedPooling):
    """Replaces each window by its l2 norm (per channel), zero padding at borders.

    Bounds: output ``sqrt(overlap) ||x||`` (``= ||x||`` for non-overlapping
    windows), Lipschitz ``sqrt(overlap)``, no variables. The window sum is exact
    (explicit zero padding), never an average rescaled by the window area,
    which over-states norms at borders.

    It is also a nonlinearity that keeps gradient norms: a window's gradient
    is ``w / ||w||`` times its cotangent, so with non-overlapping windows the
    backward pass preserves the cotangent's norm (up to the smoothing at 0).
    Directly after a convolution it can replace the activation, at the cost
    of a max pooling (``configs/mnist_conv.yaml``). An ``Abs`` before it
    changes nothing (the pooling squares its inputs); a GroupSort does (it
    sorts each position's channel pairs before the windows are summed).
    """

    def call(self, inputs):
        squares = tf.square(inputs)
        if self.padding == "same":
            pads = [
                _same_padding(int(inputs.shape[axis]), k, s) for axis, k, s in zip((1, 2), self.pool_size, self.strides)
            ]
            squares = tf.pad(squares, [[0, 0], pads[0], pads[1], [0, 0]])
        area = self.pool_size[0] * self.pool_size[1]
        sums = tf.nn.avg_pool2d(squares, self.pool_size, self.strides, "VALID") * area
        return tf.sqrt(sums + _NORM_EPS) - math.sqrt(_NORM_EPS)


@keras.utils.register_keras_serializable("lipdp")
class MaxPooling2D(_WindowedPooling):
    """Max over each window. ``|max(w)| <= ||w||`` and max is 1-Lipschitz.

    Bounds: output ``sqrt(overlap) ||x||``, Lipschitz ``sqrt(overlap)`` (1 when
    stride == pool size), no variables.
    """

    def call(self, inputs):
        return tf.nn.max_pool2d(inputs, self.pool_size, self.strides, self.padding.upper())


@keras.utils.register_keras_serializable("lipdp")
class GlobalL2NormPooling2D(DPLayer, keras.layers.Layer):
    """Per channel, the l2 norm over the spatial axes: ``(B,H,W,C) -> (B,C)``.

    Bounds: output ``<= ||x||`` (the channel norms have total norm ``||x||``),
    Lipschitz 1 (the map ``w -> ||w||`` is 1-Lipschitz per channel, and the
    channels are disjoint), no variables.
    """

    def call(self, inputs):
        sums = tf.reduce_sum(tf.square(inputs), axis=[1, 2])
        return tf.sqrt(sums + _NORM_EPS) - math.sqrt(_NORM_EPS)
