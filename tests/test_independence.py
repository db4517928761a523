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
    return lipdp.DPSequential(
        [tf.keras.Input((6,)), K.Dense(6), *hidden, K.Dense(3)], mechanism={"name": "flat", "clip_norm": 0.1}
    )


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
    "Lambda subtracting the last example": lambda: [K.Lambda(lambda t: t - t[-1:])],
    "mixing below 1e-4 of a large channel": lambda: [
        K.Lambda(lambda t: tf.concat([t + 1e-5 * tf.reduce_sum(t, 0), 1e5 + 0 * t[:, :1]], -1))
    ],
    "custom gradient normalised over the batch": lambda: [K.Lambda(batch_normalised_gradient)],
    "trainable variable written from the batch": lambda: [WritesTheBatchMean()],
}


@tf.custom_gradient
def batch_normalised_gradient(t):
    """Identity forward; its gradient divides by the norm of the whole batch's cotangent (mixing backwards only)."""
    return tf.identity(t), lambda g: g / (tf.norm(g) + 1e-6)


class WritesTheBatchMean(K.Layer):
    def build(self, input_shape):
        self.memo = self.add_weight("memo", shape=(input_shape[-1],), initializer="zeros", trainable=True)

    def call(self, inputs, training=None):
        if training:
            self.memo.assign(tf.reduce_mean(inputs, 0))
        return inputs


class BatchBalancedCrossentropy(tf.keras.losses.Loss):
    """Class weights from the batch's label frequencies: one example moves the others' losses."""

    def call(self, y_true, y_pred):
        weights = 1.0 / (tf.reduce_mean(y_true, 0) + 0.1)
        return tf.reduce_sum(weights * y_true * -tf.nn.log_softmax(y_pred), -1)


@pytest.mark.parametrize("name", MIXING)
def test_clipping_models_refuse_nested_and_custom_mixing_layers(name):
    model = clipping_model(*MIXING[name]())
    model.compile("sgd", loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    x, y = data()
    state = [np.array(v.numpy()) for v in model.variables]
    with pytest.raises(ModelNotSupportedError, match="does not keep examples independent"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=8), noise_multiplier=1.0)
    for variable, value in zip(model.variables, state):  # the probe wrote nothing into the model
        np.testing.assert_array_equal(variable.numpy(), value)


def test_a_loss_mixing_examples_is_refused():
    model = clipping_model()
    model.compile("sgd", loss=BatchBalancedCrossentropy())
    with pytest.raises(ModelNotSupportedError, match="one example changes the other examples' losses"):
        check_examples_independent(model)


@pytest.mark.parametrize(
    "augmentation",
    [K.RandomFlip("horizontal"), K.RandomRotation(0.2), K.RandomTranslation(0.2, 0.2), K.RandomContrast(0.3)],
    ids=lambda layer: type(layer).__name__,
)
def test_random_augmentation_layers_pass_and_their_generators_are_left_as_found(augmentation):
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), augmentation, K.Flatten(), K.Dense(3)])
    model(np.zeros((2, 8, 8, 1), "float32"), training=True)  # builds the generator
    generators = lipdp.backend.random_generators(model)
    assert generators, "the augmentation layer's generator is found"
    states = [g.state.numpy().copy() for g in generators]
    check_examples_independent(model)
    for generator, state in zip(generators, states):
        np.testing.assert_array_equal(generator.state.numpy(), state)


def test_a_moving_statistic_is_named_as_a_release():
    with pytest.raises(ModelNotSupportedError, match="writes the variable .*moving_mean"):
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
