"""Gradient-norm-preserving activations.

Each acts per sample and satisfies ``||f(x)|| <= ||x||`` and
``||J_f(x)^T z|| <= ||z||``: sorting permutes coordinates (its Jacobian is a
permutation matrix, norms are preserved exactly); ReLU and Abs have diagonal
Jacobians with entries in {0, 1} and {-1, 1}. They have no variables.
"""

import tensorflow as tf

from lipdp.backend import keras
from lipdp.layers.base import DPLayer


@tf.custom_gradient
def _sort_pairs(first, second):
    """``(min, max)`` of two tensors, whose backward pass is a permutation, ties included.

    ``tf.minimum`` and ``tf.maximum`` each send the cotangent to ``first`` when
    ``first == second``, so at a tie both cotangents would reach ``first``: a
    backward map of norm ``sqrt 2``, which breaks the Lipschitz bound. The
    custom gradient routes them by one strict comparison instead, so every
    entry of the input receives the cotangent of exactly one output entry,
    at ties too. (Forward min/max and two selects backward: the earlier
    ``tf.where`` forward cost four selects, zero tensors and sums backward,
    about half of a step of the GroupSort CNN that ``configs/mnist_conv.yaml``
    had then.)
    """

    def grad(upstream):
        swap = first > second
        low, high = tf.split(upstream, 2, axis=-1)
        return tf.where(swap, high, low), tf.where(swap, low, high)

    return tf.concat([tf.minimum(first, second), tf.maximum(first, second)], axis=-1), grad


@keras.utils.register_keras_serializable("lipdp")
class GroupSort(DPLayer, keras.layers.Layer):
    """Sorts the last axis in groups of ``group_size`` (GroupSort-2 by default).

    Groups are disjoint sets of channels; for ``group_size=2`` channel ``i`` is
    paired with channel ``i + C/2``. Bounds: output ``||x||`` (a permutation
    of the entries), Lipschitz 1 (the Jacobian is a permutation matrix), no
    variables. Ties are routed as a permutation in the backward pass too
    (see ``_sort_pairs``; ``tf.sort`` does so through its top-k indices).
    ``group_size=None`` sorts the whole last axis (FullSort).
    """

    def __init__(self, group_size=2, **kwargs):
        super().__init__(**kwargs)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.group_size is not None and channels % self.group_size:
            raise ValueError(
                f"{self.name}: the last axis ({channels}) is not divisible by group_size={self.group_size}"
            )
        super().build(input_shape)

    def call(self, inputs):
        if self.group_size == 2:  # pairs channel i with i + C/2: slicing, 4x faster than reshaping
            return _sort_pairs(*tf.split(inputs, 2, axis=-1))
        if self.group_size is None:
            return tf.sort(inputs, axis=-1)
        groups = tf.reshape(inputs, tf.concat([tf.shape(inputs)[:-1], [-1, self.group_size]], 0))
        return tf.reshape(tf.sort(groups, axis=-1), tf.shape(inputs))

    def get_config(self):
        return {**super().get_config(), "group_size": self.group_size}


@keras.utils.register_keras_serializable("lipdp")
class FullSort(GroupSort):
    """Sorts the whole last axis. Bounds: output ``||x||``, Lipschitz 1, no variables."""

    def __init__(self, **kwargs):
        kwargs.pop("group_size", None)
        super().__init__(group_size=None, **kwargs)


@keras.utils.register_keras_serializable("lipdp")
class ReLU(DPLayer, keras.layers.Layer):
    """``max(x, 0)``. Bounds: output ``<= ||x||``, Lipschitz 1 (Jacobian diag in {0,1}), no variables."""

    def call(self, inputs):
        return tf.nn.relu(inputs)


@keras.utils.register_keras_serializable("lipdp")
class Abs(DPLayer, keras.layers.Layer):
    """``|x|``. Bounds: output ``= ||x||``, Lipschitz 1 (Jacobian diag in {-1,1}), no variables."""

    def call(self, inputs):
        return tf.abs(inputs)
