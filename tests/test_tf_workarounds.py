"""The TensorFlow workarounds (lipdp/tf_workarounds.py): the empty-batch stand-in and its removal."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp.layers as L
from lipdp.tf_workarounds import with_stand_in_for_empty_batch, without_stand_in


def test_stand_in_is_added_only_to_an_empty_batch_and_dropped_again():
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    np.testing.assert_array_equal(with_stand_in_for_empty_batch(x).numpy(), x)
    stand_in = with_stand_in_for_empty_batch(x[:0])
    np.testing.assert_array_equal(stand_in.numpy(), np.zeros((1, 3, 4)))
    assert without_stand_in(stand_in, 0).shape == (0, 3, 4)
    np.testing.assert_array_equal(without_stand_in(tf.constant(x), 2).numpy(), x)

    @tf.function(input_signature=[tf.TensorSpec((None, 3, 4))])
    def round_trip(batch):
        padded = with_stand_in_for_empty_batch(batch)
        assert padded.shape.as_list() == [None, 3, 4]  # the static example shape survives
        return without_stand_in(padded, tf.shape(batch)[0])

    assert round_trip(x[:0]).shape == (0, 3, 4)
    np.testing.assert_array_equal(round_trip(x).numpy(), x)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32)])
    def unknown_rank(labels):
        return without_stand_in(with_stand_in_for_empty_batch(labels), tf.shape(labels)[0])

    assert unknown_rank(np.zeros((0, 3), "int32")).shape == (0, 3)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("bias_bound", [None, 0.5])
@pytest.mark.parametrize("kernel_size, strides", [(3, 1), (3, 2), (1, 2)])
def test_conv_forward_graph_takes_an_empty_batch(padding, bias_bound, kernel_size, strides):
    """A forward-only graph (predict, a frozen layer): oneDNN may fuse what precedes a VALID convolution."""
    layer = L.LipschitzConv2D(5, kernel_size, strides=strides, padding=padding, bias_bound=bias_bound)
    layer.build((None, 7, 7, 2))
    forward = tf.function(layer, input_signature=[tf.TensorSpec((None, 7, 7, 2))])
    expected = tuple(layer.compute_output_shape((None, 7, 7, 2))[1:])
    assert tuple(forward(tf.zeros((0, 7, 7, 2))).shape) == (0, *expected)
    x = tf.random.stateless_normal((3, 7, 7, 2), seed=(0, 1))
    np.testing.assert_allclose(forward(x).numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
