"""Feature statistics released under DP before training (lipdp.statistics) and their accounting."""

import dataclasses
import json
import math
import os

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from lipdp import accounting, cli, config, data, statistics
from lipdp import sampling as sampling_lib
from lipdp.layers import ChannelStandardization
from lipdp.layers.frontends import array_fingerprint, cached_features
from lipdp.ledger import ledger_from_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
SHAPE = (4, 4, 3)  # P = 16 positions, C = 3 channels


def standardization_layer(model):
    return next(layer for layer in model.layers if isinstance(layer, ChannelStandardization))


def adversarial_examples(clip_norm):
    """Examples at the two extremes of the bounds: one channel spread evenly (the mean's), one entry (the square's)."""
    spread = np.zeros(SHAPE)
    spread[..., 1] = 1.0
    peak = np.zeros(SHAPE)
    peak[2, 3, 0] = 1.0
    huge = np.full(SHAPE, 1e6)  # clipped to clip_norm first
    return [clip_norm * spread / np.linalg.norm(spread), -clip_norm * peak, clip_norm * peak, huge]


def released_sum(x, clip_norm, bound, centre=None):
    """What a stage sums before its noise: the projected per-example vectors of ``x``."""
    means, mean_squares = statistics.example_moments(x, clip_norm)
    rows = means if centre is None else statistics.squared_deviations(means, mean_squares, centre)
    return statistics.project_rows(rows, bound).sum(axis=0)


def largest_move(clip_norm, bound, centre=None):
    """The largest change of a stage's sum when one example (random or adversarial) joins 20 others."""
    rng = np.random.default_rng(0)
    others = rng.normal(size=(20,) + SHAPE) * rng.uniform(0.1, 3.0, size=(20, 1, 1, 1))
    candidates = list(rng.normal(size=(200,) + SHAPE) * 5) + adversarial_examples(clip_norm)
    base = released_sum(others, clip_norm, bound, centre)
    moves = [
        np.linalg.norm(released_sum(np.concatenate([others, c[None]]), clip_norm, bound, centre) - base)
        for c in candidates
    ]
    return max(moves), moves


@pytest.mark.parametrize("mean_clip", [None, 0.3])
def test_one_example_moves_the_released_means_by_at_most_their_sensitivity(mean_clip):
    clip_norm = 2.5
    bound = statistics.mean_sensitivity(SHAPE, clip_norm, mean_clip)
    assert bound == (clip_norm / 4 if mean_clip is None else mean_clip)  # P = 16 positions
    largest, moves = largest_move(clip_norm, bound)
    assert largest <= bound * (1 + 1e-9)
    assert moves[-4] == pytest.approx(bound, rel=1e-9)  # one channel spread evenly reaches it: the bound is tight


@pytest.mark.parametrize("variance_clip", [None, 0.05])
def test_one_example_moves_the_released_deviations_by_at_most_their_sensitivity(variance_clip):
    clip_norm = 2.5
    centre = np.array([0.4, -0.1, 0.2])  # the released means: public when the second stage runs
    bound = statistics.deviation_sensitivity(SHAPE, clip_norm, centre, variance_clip)
    worst = (clip_norm + 4 * np.linalg.norm(centre)) ** 2 / 16
    assert bound == pytest.approx(worst if variance_clip is None else variance_clip, rel=1e-12)
    largest, moves = largest_move(clip_norm, bound, centre)
    assert largest <= bound * (1 + 1e-9)
    assert largest >= 0.5 * bound  # the adversarial examples come close: the bound is not vacuous


class RecordingGenerator:
    """A stand-in for ``numpy``'s generator: records each noise std asked for and adds no noise."""

    def __init__(self):
        self.stds = []

    def normal(self, loc, scale, size):
        self.stds.append(scale)
        return np.full(size, loc)


def test_squared_deviations_from_the_moments_equal_the_direct_computation():
    """One pass (means and mean squares) gives each clipped example's mean of (x - mu)^2 per channel."""
    rng = np.random.default_rng(1)
    clip_norm = 2.5
    x = np.concatenate([rng.normal(size=(30,) + SHAPE) * 4 + 3, np.stack(adversarial_examples(clip_norm))])
    centre = rng.normal(size=SHAPE[-1])
    clipped = x * np.minimum(1.0, clip_norm / np.linalg.norm(x.reshape(len(x), -1), axis=1))[:, None, None, None]
    direct = np.square(clipped - centre).mean(axis=(1, 2))
    deviations = statistics.squared_deviations(*statistics.example_moments(x, clip_norm), centre)
    np.testing.assert_allclose(deviations, direct, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scale", [False, True])
def test_each_stage_draws_noise_of_std_z_times_its_sensitivity(scale):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50,) + SHAPE)
    clip_norm, z, clips = 2.0, 3.0, dict(mean_clip=0.2, variance_clip=0.05 if scale else None)
    recorder = RecordingGenerator()
    layer = statistics.release_channel_statistics(
        x, clip_norm=clip_norm, noise_multiplier=z, scale=scale, rng=recorder, **clips
    )
    spread = z * (math.sqrt(2.0) if scale else 1.0)  # two stages of z sqrt 2 compose to one Gaussian of z
    expected = [spread * 0.2] + ([spread * 0.05] if scale else [])
    assert recorder.stds == pytest.approx(expected, rel=1e-12)
    exact_mean = statistics.project_rows(statistics.example_moments(x, clip_norm)[0], 0.2).mean(axis=0)
    np.testing.assert_allclose(layer.mean, exact_mean, rtol=1e-6)  # no noise drawn: the sum itself
    with pytest.raises(ValueError, match="variance_clip .* needs scale=True"):
        statistics.release_channel_statistics(x, clip_norm=1.0, noise_multiplier=1.0, variance_clip=0.1)
    for shapeless in (x[:0], x[:, 0, 0, 0]):  # no example; no channel axis
        with pytest.raises(ValueError, match=r"x: expected features of shape \(N, ..., C\) with N >= 1"):
            statistics.release_channel_statistics(shapeless, clip_norm=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_the_two_stages_spend_exactly_the_release_the_accountant_counts(accountant, sampling):
    """Each stage's drawn noise over its sensitivity, composed, against the layer's one release event."""
    x = np.random.default_rng(3).normal(size=(50,) + SHAPE)
    recorder = RecordingGenerator()
    layer = statistics.release_channel_statistics(
        x, clip_norm=2.0, noise_multiplier=3.0, scale=True, mean_clip=0.2, variance_clip=0.05, rng=recorder
    )  # both clips below the bounds from R: the sensitivities are the clips
    sampler = sampling_lib.sampler_class(sampling)
    stages = dp_accounting.ComposedDpEvent(
        [sampler.release_event(std / bound) for std, bound in zip(recorder.stds, (0.2, 0.05))]
    )
    (counted,) = layer.release_noise_multipliers

    def epsilon(event):
        return accounting.make_accountant(accountant).compose(event).get_epsilon(1e-5)

    assert epsilon(stages) == pytest.approx(epsilon(sampler.release_event(counted)), rel=1e-6)


@pytest.mark.parametrize("scale", [False, True])
def test_released_means_carry_noise_of_the_stated_std(scale):
    x = np.zeros((50,) + SHAPE)  # every statistic is 0: what is released is the noise
    clip_norm, z = 2.0, 3.0
    rng = np.random.default_rng(1)
    means = np.array(
        [
            statistics.release_channel_statistics(x, clip_norm=clip_norm, noise_multiplier=z, scale=scale, rng=rng).mean
            for _ in range(2000)
        ]
    )
    expected = z * statistics.mean_sensitivity(SHAPE, clip_norm) * (math.sqrt(2.0) if scale else 1.0) / len(x)
    assert np.std(means) / expected == pytest.approx(1.0, abs=0.03)
    assert abs(np.mean(means)) < 0.05 * expected


def test_statistics_estimate_the_clipped_data_and_the_layer_standardises():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=[1.0, -2.0, 0.5], scale=[0.5, 1.0, 2.0], size=(20000,) + SHAPE)  # norms about 16
    layer = statistics.release_channel_statistics(
        x, clip_norm=40.0, noise_multiplier=1.0, scale=True, variance_clip=20.0, rng=rng
    )  # squared-deviation vectors have norms near 4 here: the clip rarely acts
    np.testing.assert_allclose(layer.mean, [1.0, -2.0, 0.5], atol=0.02)
    np.testing.assert_allclose(layer.scale, [0.5, 1.0, 2.0], rtol=0.03)
    y = layer(x[:500].astype("float32")).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    clone = ChannelStandardization.from_config(layer.get_config())
    np.testing.assert_array_equal(clone(x[:3].astype("float32")).numpy(), y[:3])
    with pytest.raises(ValueError, match="3 channel statistics for 2 channels"):
        ChannelStandardization([0.0] * 3, [1.0] * 3, 1.0, noise_multiplier=None)(np.zeros((1, 2, 2, 2), "float32"))


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_epsilon_composes_the_release_with_the_steps_as_dp_accounting_does(sampling):
    schedule = dict(sampling_rate=0.05, steps=300, sampling=sampling, steps_per_epoch=20)
    with_release = accounting.compute_epsilon(noise_multiplier=1.2, delta=1e-5, releases=(8.0,), **schedule)
    sensitivity = 2.0 if sampling == "shuffle" else 1.0  # replace-one adjacency doubles it
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(8.0 / sensitivity),
            accounting.training_event(noise_multiplier=1.2, **schedule),
        ]
    )
    expected = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert with_release == pytest.approx(expected, rel=1e-12)
    assert with_release > accounting.compute_epsilon(noise_multiplier=1.2, delta=1e-5, **schedule)
    release_only = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(8.0 / sensitivity))
    assert accounting.compute_epsilon(
        noise_multiplier=1.2, delta=1e-5, releases=(8.0,), **{**schedule, "steps": 0}
    ) == pytest.approx(release_only.get_epsilon(1e-5), rel=1e-12)


def test_calibration_and_budgets_leave_room_for_the_release():
    schedule = dict(delta=1e-5, sampling_rate=0.05, steps=300)
    plain = accounting.calibrate_noise_multiplier(target_epsilon=3.0, **schedule)
    noisier = accounting.calibrate_noise_multiplier(target_epsilon=3.0, releases=(5.0,), **schedule)
    assert noisier > plain
    epsilon = accounting.compute_epsilon(noise_multiplier=noisier, releases=(5.0,), **schedule)
    assert epsilon <= 3.0 and epsilon == pytest.approx(3.0, rel=1e-3)
    steps = accounting.max_steps(
        epsilon_budget=3.0, delta=1e-5, sampling_rate=0.05, noise_multiplier=noisier, releases=(5.0,)
    )
    assert steps >= 300
    with pytest.raises(accounting.PrivacyParameterError, match="already spend"):
        accounting.max_steps(epsilon_budget=0.1, delta=1e-5, sampling_rate=0.05, noise_multiplier=1.0, releases=(0.5,))


def test_training_run_releases_once_records_it_and_saves_a_raw_input_model(tmp_path):
    out = str(tmp_path / "run")
    args = ["train", DIGITS, "--out", out, "--verbose", "0", "--set", "training.epochs=2"]
    args += ["--set", "model.feature_statistics={noise_multiplier: 20, clip_norm: 8, scale: true, variance_clip: 0.1}"]
    assert cli.main(args) == 0
    record = json.load(open(os.path.join(out, "feature_statistics.json")))["release"]
    assert (record["variance_clip"], "mean_clip" in record) == (0.1, False)
    privacy = json.load(open(os.path.join(out, "privacy.json")))
    assert privacy["release_noise_multipliers"] == [20.0]
    assert [e["class_name"] for e in privacy["ledger"]["events"]] == ["GaussianDpEvent", "SelfComposedDpEvent"]
    ledger = ledger_from_json(privacy["ledger"])
    assert privacy["epsilon"] == pytest.approx(
        dp_accounting.rdp.RdpAccountant().compose(ledger).get_epsilon(privacy["delta"])
    )
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    released = json.load(open(os.path.join(out, "feature_statistics.json")))["layer"]
    layer = standardization_layer(model)
    assert layer.mean == released["mean"] and layer.scale == released["scale"]
    digits = data.load("digits")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    accuracy = np.mean(np.argmax(model.predict(digits.x_test, verbose=0), 1) == np.argmax(digits.y_test, 1))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)  # raw inputs in, the release inside


def planted_release(tmp_path, layer_noise_multiplier):
    """A run folder holding the digits release record of ``{noise_multiplier: 20, clip_norm: 8}`` (a crash left it),
    whose layer carries ``layer_noise_multiplier``."""
    out = tmp_path / "run"
    out.mkdir()
    x_train = data.load("digits").x_train
    release = {"noise_multiplier": 20.0, "clip_norm": 8.0, "scale": False, "examples": len(x_train)}
    release["data"] = array_fingerprint(x_train)
    layer = ChannelStandardization(
        [0.25], [0.5], 8.0, noise_multiplier=layer_noise_multiplier, name="channel_standardization"
    )
    (out / "feature_statistics.json").write_text(json.dumps({"release": release, "layer": layer.get_config()}))
    return out


def test_a_resumed_run_reuses_the_same_release_only(tmp_path, capsys):
    out = planted_release(tmp_path, 20.0)
    args = ["train", DIGITS, "--out", str(out), "--verbose", "0", "--set", "training.epochs=1"]
    others = ["{noise_multiplier: 50, clip_norm: 8}", "{noise_multiplier: 20, clip_norm: 8, scale: true}", "null"]
    others.append("{noise_multiplier: 20, clip_norm: 8, mean_clip: 0.5}")  # a clip the release was not drawn with
    for other in others:
        assert cli.main(args + ["--set", f"model.feature_statistics={other}"]) == 2  # never accounted as another
        assert "holds a release made with" in capsys.readouterr().err
    assert cli.main(args + ["--set", "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}"]) == 0
    layer = standardization_layer(tf.keras.models.load_model(str(out / "model.keras")))
    assert (layer.mean, layer.scale) == ([0.25], [0.5])


def test_a_release_record_whose_layer_claims_another_noise_is_refused(tmp_path, capsys):
    """The layer's noise multiplier is what the accountant counts: it must be the one the release was drawn with."""
    out = planted_release(tmp_path, 1000.0)  # edited after the draw
    args = ["train", DIGITS, "--out", str(out), "--verbose", "0", "--set", "training.epochs=1"]
    assert cli.main(args + ["--set", "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}"]) == 2
    assert "is inconsistent: its layer carries noise multiplier 1000.0" in capsys.readouterr().err
    assert not (out / "privacy.json").exists()


def test_an_impossible_budget_fails_before_anything_is_released(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", DIGITS, "--out", str(out), "--verbose", "0"]
    assert cli.main(args + ["--set", "model.feature_statistics={noise_multiplier: 0.3, clip_norm: 8}"]) == 2
    assert "alone spend" in capsys.readouterr().err
    assert not (out / "feature_statistics.json").exists()


def test_config_mistakes_are_named():
    for spec, message in [
        ("{noise_multiplier: 20, clip_norn: 8}", "did you mean 'clip_norm'"),
        ("{clip_norm: 8}", "noise_multiplier: a finite number > 0"),
        ("{noise_multiplier: .inf, clip_norm: 8}", "noise_multiplier: a finite number > 0"),
        ("{noise_multiplier: 20, clip_norm: 8, scale: 1}", "true or false"),
        ("{noise_multiplier: 20, clip_norm: 8, mean_clip: 0}", "mean_clip: a finite number > 0"),
        ("{noise_multiplier: 20, clip_norm: 8, variance_clip: 0.1}", "variance_clip: clips the variance release"),
        ("{noise_multiplier: 20, clip_norm: 8, scale: true, varience_clip: 1}", "did you mean 'variance_clip'"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(DIGITS, [f"model.feature_statistics={spec}"])
    with pytest.raises(config.ConfigError, match="multi_worker"):
        config.load(
            DIGITS,
            ["model.feature_statistics={noise_multiplier: 20, clip_norm: 8}", "training.strategy=multi_worker"],
        )


def test_a_released_layer_in_an_api_model_is_accounted_without_being_told():
    """The issue's case: noise 0.5 before the clip, made private without releases=, reported 0.56 instead of 8.46."""
    import lipdp
    from lipdp import layers as L

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500,) + SHAPE).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 500)]
    layer = statistics.release_channel_statistics(x, clip_norm=4.0, noise_multiplier=0.5)
    model = lipdp.DPSequential([tf.keras.Input(SHAPE), layer, L.InputNormClip(1.0), L.Flatten(), L.LipschitzDense(3)])
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=50)
    policy = model.make_private(sampler, noise_multiplier=2.0, delta=1e-4)
    assert policy.release_noise_multipliers == (0.5,)
    model.fit(sampler, epochs=1, verbose=0)
    steps = dict(sampling_rate=0.1, noise_multiplier=2.0, steps=10, delta=1e-4)
    assert model.epsilon() == pytest.approx(accounting.compute_epsilon(releases=(0.5,), **steps), rel=1e-12)
    assert model.epsilon() > 2 * accounting.compute_epsilon(**steps)
    assert "1 Gaussian release(s)" in model.privacy_statement()


def test_statistics_of_non_finite_data_are_refused_before_any_release(tmp_path, monkeypatch, capsys):
    x = np.ones((10,) + SHAPE)
    x[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(1 record"):
        statistics.release_channel_statistics(x, clip_norm=1.0, noise_multiplier=1.0)
    digits = data.load("digits")
    broken = digits.x_train.copy()
    broken[5] = np.inf
    monkeypatch.setattr(data, "load", lambda *a, **k: dataclasses.replace(digits, x_train=broken))
    out = tmp_path / "run"
    args = ["train", DIGITS, "--out", str(out), "--verbose", "0"]
    assert cli.main(args + ["--set", "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}"]) == 2
    assert "NaN or inf" in capsys.readouterr().err
    assert not (out / "feature_statistics.json").exists()


def test_a_model_carrying_a_release_its_policy_does_not_account_is_refused():
    """A head trained on released features without releases=, then assembled with the layer: no statement."""
    import lipdp
    from lipdp import layers as L
    from lipdp import training
    from lipdp.errors import NotPrivateError

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500,) + SHAPE).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 500)]
    layer = statistics.release_channel_statistics(x, clip_norm=4.0, noise_multiplier=2.0)
    features = cached_features(layer, x)
    head = lipdp.DPSequential([tf.keras.Input(SHAPE), L.InputNormClip(1.0), L.Flatten(), L.LipschitzDense(3)])
    head.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    sampler = lipdp.PoissonSampler(features, y, expected_batch_size=50)
    head.make_private(sampler, noise_multiplier=2.0, delta=1e-4)
    head.fit(sampler, epochs=1, verbose=0)
    assembled = training.with_frontend(head, [layer], SHAPE)
    with pytest.raises(NotPrivateError, match="does not account"):
        assembled.privacy_statement()
