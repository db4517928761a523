"""The Keras seam: lipdp runs on the Keras 2 API, and a Keras 3 object gets a clear refusal."""

import pytest
import tensorflow as tf

import lipdp
from lipdp import backend
from lipdp import layers as L
from lipdp.errors import ModelNotSupportedError


def test_lipdp_keras_is_the_keras_of_tf_keras_after_import():
    assert lipdp.keras is backend.keras
    assert tf.keras.layers.Dense is lipdp.keras.layers.Dense  # the user's tf.keras is the same Keras 2
    assert isinstance(L.LipschitzDense(3), lipdp.keras.layers.Layer)


def test_layer_calls_name_every_call_inputs_first():
    inputs = lipdp.keras.Input((4,))
    hidden = L.LipschitzDense(4)(L.InputNormClip(1.0)(inputs))
    model = lipdp.keras.Model(inputs, L.Add()([hidden, hidden]))
    calls = backend.layer_calls(model)
    assert [type(c.layer).__name__ for c in calls] == ["InputLayer", "InputNormClip", "LipschitzDense", "Add"]
    assert calls[-1].input_ids == [calls[2].output_ids[0]] * 2  # one tensor read twice has one id


def test_a_keras_3_layer_is_refused_with_what_to_do():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip(f"the installed keras is {keras3.__version__}, Keras 2 (TensorFlow <= 2.15): nothing to refuse")
    with pytest.raises(ModelNotSupportedError, match="Keras 3 object.*lipdp.keras"):
        lipdp.DPSequential([keras3.Input((4,)), keras3.layers.Dense(3)])
    with pytest.raises(ModelNotSupportedError, match="Keras 3 object"):
        lipdp.DPSequential([tf.keras.Input((4,)), keras3.layers.Dense(3)])
    inputs = keras3.Input((4,))
    with pytest.raises(ModelNotSupportedError, match="model output .* Keras 3 object"):
        lipdp.DPModel(inputs, keras3.layers.Dense(3)(inputs))
