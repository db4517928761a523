"""Every layer's config round trip, and a saved model holding every layer."""

import json

import numpy as np
import pytest
import tensorflow as tf
from layer_checks import nonzero_bias

import lipdp.layers as L
from lipdp import losses

CONFIG_LAYERS = [
    lambda: L.LipschitzDense(5, weight_constraint="spectral", lipschitz_target=2.0, bias_bound=0.3),
    lambda: L.LipschitzDense(4, weight_constraint="orthogonal"),
    lambda: L.LipschitzConv2D(
        3, (3, 2), strides=(2, 1), padding="valid", weight_constraint="frobenius", lipschitz_target=0.5, bias_bound=0.2
    ),
    lambda: L.GroupSort(4),
    L.FullSort,
    L.ReLU,
    L.Abs,
    lambda: L.L2NormPooling2D(3, 2, "same"),
    lambda: L.MaxPooling2D((2, 3), (1, 2), "same"),
    L.GlobalL2NormPooling2D,
    lambda: L.InputNormClip(2.5),
    lambda: L.LayerCentering((1, 2)),
    L.LayerCentering,
    L.Flatten,
    lambda: L.Reshape((-1, 2)),
    L.Add,
    L.Average,
    lambda: L.ClipGradient(0.1),
]


@pytest.mark.parametrize("factory", CONFIG_LAYERS, ids=lambda f: type(f()).__name__)
def test_get_config_round_trips(factory):
    layer = factory()
    config = layer.get_config()
    through_json = json.loads(json.dumps(config))
    clone = type(layer).from_config(through_json)
    assert type(clone) is type(layer)
    assert json.loads(json.dumps(clone.get_config())) == through_json
    restored = tf.keras.layers.deserialize(json.loads(json.dumps(tf.keras.layers.serialize(layer))))
    assert type(restored) is type(layer)
    assert tf.keras.utils.get_registered_name(type(layer)) == f"lipdp>{type(layer).__name__}"
    for attr in (
        "weight_constraint",
        "lipschitz_target",
        "bias_bound",
        "overlap",
        "pool_size",
        "strides",
        "padding",
        "group_size",
        "norm",
        "axes",
        "clip_value",
    ):
        if hasattr(layer, attr):
            assert getattr(restored, attr) == getattr(layer, attr), attr


def _every_layer_model():
    inp = tf.keras.Input((16, 16, 2))
    h = L.Scattering2D(J=1, L=4, normalize="group", groups=2)(inp)  # 8 x 8 x 10
    h = L.ChannelStandardization(
        np.linspace(-0.5, 0.5, 10), np.linspace(0.5, 2.0, 10), clip_norm=20.0, noise_multiplier=None
    )(h)
    h = L.InputNormClip(3.0)(h)
    h = L.LayerCentering(axes=(1, 2))(h)
    h = L.LipschitzConv2D(4, 3, bias_bound=0.5)(h)
    h = L.GroupSort(2)(h)
    h = L.LipschitzConv2D(4, (3, 2), strides=(2, 1), weight_constraint="spectral", bias_bound=0.4)(h)
    branch = L.ReLU()(h)
    branch = L.LipschitzConv2D(4, 1, weight_constraint="frobenius", bias_bound=0.3)(branch)
    h = L.Add()([h, branch])
    h = L.Average()([h, L.Abs()(h)])
    h = L.FullSort()(h)
    h = L.MaxPooling2D(pool_size=3, strides=2, padding="same")(h)  # 2 x 4
    h = L.L2NormPooling2D(pool_size=2, strides=1, padding="same")(h)  # 2 x 4
    g = L.GlobalL2NormPooling2D()(h)
    f = L.LipschitzDense(4, weight_constraint="spectral", bias_bound=0.2)(L.Flatten()(h))
    h = L.Add()([g, f])
    h = L.Reshape((2, 2))(h)
    h = L.LipschitzDense(4, bias_bound=0.3)(h)  # two positions
    h = L.AdaptiveClipGradient(0.4)(L.ClipGradient(0.5)(L.Flatten()(h)))
    out = L.LipschitzDense(3, bias_bound=0.5)(h)
    model = tf.keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=losses.TauCategoricalCrossentropy(tau=3.0))
    for layer in model.layers:
        if getattr(layer, "use_bias", False):
            nonzero_bias(layer)
    return model


def test_model_with_every_layer_saves_and_loads(tmp_path):
    model = _every_layer_model()
    types = {type(layer) for layer in model.layers}
    expected = {
        getattr(L, n)
        for n in L.__all__
        if isinstance(getattr(L, n), type) and issubclass(getattr(L, n), tf.keras.layers.Layer)
    }
    assert expected <= types, expected - types
    x = np.random.default_rng(18).normal(size=(5, 16, 16, 2)).astype("float32")
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for old, new in zip(model.layers, loaded.layers):
        if isinstance(old, L.DPLayer):
            assert float(new.lipschitz_constant()) == float(old.lipschitz_constant())
        if hasattr(old, "positions"):
            assert new.positions == old.positions
    for old, new in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(old.numpy(), new.numpy())
    assert isinstance(loaded.loss, losses.TauCategoricalCrossentropy) and loaded.loss.tau == 3.0
