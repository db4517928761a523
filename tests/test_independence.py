"""The per-example independence probe: nested or custom layers that mix examples or keep batch state are refused."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp.errors import ModelNotSupportedError
from lipdp.independence import check_examples_independent

K = tf.keras.layers


class HiddenNormaliser(K.Layer):
    """A custom layer hiding a BatchNormalization from a check by class."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = K.BatchNormalization()

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)


class CentresTheBatch(L.LipschitzDense):
    """A DP layer (certified bounds of a dense layer) that also subtracts the batch mean: mixing examples."""

    def call(self, inputs):
        outputs = super().call(inputs)
        return outputs - tf.reduce_mean(outputs, axis=0)


def clipping_model(*hidden):
    return lipdp.DPSequential([tf.keras.Input((6,)), K.Dense(6), *hidden, K.Dense(3)], clipping="flat", clip_norm=0.1)


def data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, n)]


MIXING = {
    "TimeDistributed(BatchNormalization)": lambda: [
        K.Reshape((2, 3)),
        K.TimeDistributed(K.BatchNormalization()),
        K.Flatten(),
    ],
    "custom layer holding a BatchNormalization": lambda: [HiddenNormaliser()],
    "Lambda subtracting the batch mean": lambda: [K.Lambda(lambda t: t - tf.reduce_mean(t, axis=0))],
}


@pytest.mark.parametrize("name", MIXING)
def test_clipping_models_refuse_nested_and_custom_mixing_layers(name):
    model = clipping_model(*MIXING[name]())
    model.compile("sgd", loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    x, y = data()
    state = [np.array(v.numpy()) for v in model.non_trainable_variables]
    with pytest.raises(ModelNotSupportedError, match="does not keep examples independent"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=8), noise_multiplier=1.0)
    for variable, value in zip(model.non_trainable_variables, state):  # the probe wrote nothing into the model
        np.testing.assert_array_equal(variable.numpy(), value)


def test_a_moving_statistic_is_named_as_a_release():
    with pytest.raises(ModelNotSupportedError, match="updates the non-trainable variable .*moving_mean"):
        check_examples_independent(tf.keras.Sequential([tf.keras.Input((6,)), HiddenNormaliser(name="holder")]))


def test_every_problem_is_reported_at_once():
    model = tf.keras.Sequential(
        [tf.keras.Input((6,)), K.Lambda(lambda t: t - tf.reduce_mean(t, axis=0)), K.BatchNormalization()]
    )
    with pytest.raises(ModelNotSupportedError) as refused:
        check_examples_independent(model)
    assert "(Lambda)" in str(refused.value) and "moving_mean" in str(refused.value)


def test_a_clipless_dp_layer_that_mixes_examples_is_refused():
    model = lipdp.DPSequential([tf.keras.Input((6,)), L.InputNormClip(1.0), CentresTheBatch(3)])
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    x, y = data()
    with pytest.raises(ModelNotSupportedError, match="centres_the_batch"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=8), noise_multiplier=1.0)


def test_per_example_layers_with_randomness_pass():
    inputs = tf.keras.Input((4, 6))
    attention = K.MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.5)(inputs, inputs)
    outputs = K.Dense(3)(K.Dropout(0.5)(K.LayerNormalization()(K.Flatten()(attention))))
    check_examples_independent(tf.keras.Model(inputs, outputs))
    tf.random.set_seed(11)
    expected = tf.random.uniform([3]).numpy()
    tf.random.set_seed(11)
    check_examples_independent(tf.keras.Model(inputs, outputs))
    np.testing.assert_array_equal(tf.random.uniform([3]).numpy(), expected)  # the caller's seed is put back


def test_integer_inputs_are_probed_as_indices():
    inputs = tf.keras.Input((5,), dtype="int32")
    outputs = K.Dense(2)(K.Flatten()(K.Embedding(4, 3)(inputs)))
    check_examples_independent(tf.keras.Model(inputs, outputs))
