"""Adaptive logit clipping: the threshold tracks a quantile, its releases are accounted, the bounds hold."""

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp import sensitivity, verification


def release_steps(layer, norms_per_step, noise_multiplier, generator):
    """Runs the layer's counting backward pass on cotangents of the given norms, then its release."""
    for norms in norms_per_step:
        x = tf.zeros((len(norms), 4))
        directions = tf.math.l2_normalize(tf.random.normal((len(norms), 4)), axis=1)
        with layer.gathering(), tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
        tape.gradient(out, x, output_gradients=directions * norms[:, None])
        layer.release(noise_multiplier, float(len(norms)), generator)


@pytest.mark.parametrize("quantile", [0.3, 0.7])
def test_threshold_converges_to_the_target_quantile(quantile):
    rng = np.random.default_rng(0)
    layer = L.AdaptiveClipGradient(5.0, target_quantile=quantile, learning_rate=0.2)
    layer.build((None, 4))
    steps = [rng.uniform(0, 2, size=1000).astype("float32") for _ in range(150)]
    release_steps(layer, steps, noise_multiplier=10.0, generator=tf.random.Generator.from_seed(1))
    assert float(layer.threshold) == pytest.approx(2 * quantile, abs=0.05)  # the quantile of Uniform(0, 2)


def test_gradient_and_count_releases_compose_into_the_accounted_gaussian():
    """1/z^2 = 1/z_g^2 + 1/z_b^2: dp-accounting's epsilon of the two releases equals that of one Gaussian(z)."""
    x = np.zeros((1000, 2), "float32")
    sampler = lipdp.PoissonSampler(x, np.eye(2, dtype="float32")[np.zeros(1000, int)], expected_batch_size=100)
    policy = lipdp.PrivacyPolicy.from_sampler(sampler, noise_multiplier=1.3, delta=1e-5, quantile_noise_share=0.2)
    z_g, z_b = policy.gradient_noise_multiplier, policy.quantile_noise_multiplier
    assert 1 / z_g**2 + 1 / z_b**2 == pytest.approx(1 / 1.3**2)
    both = dp_accounting.SelfComposedDpEvent(
        dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_g), dp_accounting.GaussianDpEvent(z_b)]), 50
    )
    one = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.3), 50)
    for make in (dp_accounting.rdp.RdpAccountant, dp_accounting.pld.PLDAccountant):
        assert make().compose(both).get_epsilon(1e-5) == pytest.approx(make().compose(one).get_epsilon(1e-5), rel=1e-3)
    expected = (
        dp_accounting.rdp.RdpAccountant()
        .compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.3)), 50
            )
        )
        .get_epsilon(1e-5)
    )
    assert policy.epsilon(50) == pytest.approx(expected, rel=1e-12)


def adaptive_model(threshold=1.0):
    tf.keras.utils.set_random_seed(2)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((6,)),
            L.InputNormClip(1.0),
            L.LipschitzDense(8, bias_bound=0.5),
            L.GroupSort(),
            L.LipschitzDense(3),
            L.AdaptiveClipGradient(threshold),
        ]
    )
    model.compile("adam", loss=lipdp.losses.TauCategoricalCrossentropy(16.0))
    return model


def data(n=300):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, n)]


def test_bounds_follow_the_threshold_in_use():
    model = adaptive_model()
    x, y = data(64)
    model.layers[-1].threshold.assign(0.02)
    result = verification.verify_bounds(model, x, y, rtol=0)
    assert not result.violations and result.max_ratio > 0.99  # attained: most logit gradients exceed 0.02
    assert float(sensitivity.compute_bounds(model)[model.layers[-2].name + "/kernel"]) < 0.021


def test_training_moves_the_threshold_and_keeps_the_raw_count_out_of_saved_state(tmp_path):
    model, (x, y) = adaptive_model(threshold=5.0), data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=100)
    model.make_private(sampler, target_epsilon=4.0, epochs=4, quantile_noise_share=0.1)
    model.fit(sampler, epochs=4, verbose=0)
    assert float(model.layers[-1].threshold) < 5.0  # logit gradients of tau-CE are below sqrt(2): it shrinks
    assert model.epsilon() <= 4.0 and "adaptive logit clipping" in model.privacy_statement()
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(checkpoint)]
    assert any("threshold" in name for name in names)
    assert not [name for name in names if "count" in name and not name.startswith("save_counter")], names
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    assert float(loaded.layers[-1].threshold) == float(model.layers[-1].threshold)
    assert loaded.privacy.quantile_noise_share == 0.1


def test_make_private_refuses_an_unaccounted_or_a_missing_quantile_release():
    x, y = data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=100)
    with pytest.raises(lipdp.errors.ModelNotSupportedError, match="quantile_noise_share"):
        adaptive_model().make_private(sampler, noise_multiplier=1.0)
    plain = lipdp.DPSequential([tf.keras.Input((6,)), L.InputNormClip(1.0), L.LipschitzDense(3)])
    plain.compile("adam", loss=lipdp.losses.TauCategoricalCrossentropy())
    with pytest.raises(lipdp.errors.ModelNotSupportedError, match="needs such a layer"):
        plain.make_private(sampler, noise_multiplier=1.0, quantile_noise_share=0.1)
    with pytest.raises(lipdp.errors.PrivacyParameterError, match="Poisson"):
        adaptive_model().make_private(
            lipdp.ShuffleSampler(x, y, batch_size=100), noise_multiplier=1.0, quantile_noise_share=0.1
        )


def test_an_adaptive_layer_called_twice_is_refused():
    """Two calls count every example twice (sensitivity 2), while the count's noise is set for 1 (review finding)."""
    inp = tf.keras.Input((6,))
    h = L.InputNormClip(1.0)(inp)
    shared = L.AdaptiveClipGradient(1.0)
    out = L.Add()([shared(L.LipschitzDense(3)(h)), shared(L.LipschitzDense(3)(h))])
    model = lipdp.DPModel(inp, out)
    model.compile("adam", loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
    x, y = data()
    with pytest.raises(lipdp.errors.ModelNotSupportedError, match="called 2 times"):
        model.make_private(
            lipdp.PoissonSampler(x, y, expected_batch_size=50), noise_multiplier=1.0, quantile_noise_share=0.5
        )


def test_the_raw_count_does_not_outlive_its_release():
    model, (x, y) = adaptive_model(), data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=100)
    model.make_private(sampler, noise_multiplier=1.0, quantile_noise_share=0.1)
    model.fit(sampler, epochs=1, verbose=0)
    assert float(model.layers[-1]._count) == 0.0
