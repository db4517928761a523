"""Private hyper-parameter search: the bound is the paper's, the trial is complete, the search is released alone."""

import dataclasses
import json
import math
import os
import zipfile

import dp_accounting
import h5py
import numpy as np
import pytest
import yaml
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import optimize

from lipdp import accounting, cli, config, data, search_cost, training, tuning
from lipdp.backend import keras
from lipdp.errors import ConfigError, NotPrivateError, PrivacyParameterError
from lipdp.ledger import ledger_from_json, ledger_to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
SIGMA, DELTA = 2.0, 1e-5
GAUSSIAN = dp_accounting.GaussianDpEvent(SIGMA)
ORDERS = (2.0, 4.0, 8.0, 16.0, 32.0)
GIVEN_NOISE = ["privacy.target_epsilon=null", "privacy.noise_multiplier=3.0"]  # no calibration: seconds saved


def gaussian_rdp(order):
    """The Gaussian mechanism's RDP: order / (2 sigma^2) (Mironov 2017)."""
    return order / (2 * SIGMA**2)


def one_order_epsilon(event, order):
    """The epsilon an RDP accountant with the single ``order`` gives ``event`` (dp-accounting's conversion)."""
    return rdp.RdpAccountant([order]).compose(event).get_epsilon(DELTA)


def tnb_gamma(shape, mean):
    """gamma of the truncated negative binomial with this mean (Papernot & Steinke, Definition 1), by root finding."""
    if shape == 1:
        return 1 / mean
    if shape == 0:
        mean_of = lambda g: (1 - 1 / g) / math.log(g)  # noqa: E731  (logarithmic: (1/g - 1) / log(1/g))
    else:
        mean_of = lambda g: shape * (1 - g) / (g * (1 - g**shape))  # noqa: E731
    return optimize.brentq(lambda g: mean_of(g) - mean, 1e-12, 1 - 1e-12, xtol=1e-15)


@pytest.mark.parametrize("shape,name", [(1.0, "geometric"), (0.0, "logarithmic"), (0.5, "0.5"), (3.0, "3")])
@pytest.mark.parametrize("mean", [3.0, 10.0])
@pytest.mark.parametrize("order", ORDERS)
def test_truncated_negative_binomial_bound_is_theorem_2(shape, name, mean, order):
    # Theorem 2 with lambda = lambda_hat = order (the only order the accountant sees):
    # eps' = eps + (1 + eta) ((1 - 1/lambda) eps + log(1/gamma) / lambda) + log(E[K]) / (lambda - 1).
    gamma = tnb_gamma(shape, mean)
    epsilon = gaussian_rdp(order)
    by_hand = (
        epsilon + (1 + shape) * ((1 - 1 / order) * epsilon + math.log(1 / gamma) / order) + math.log(mean) / (order - 1)
    )
    search = search_cost.TrialCount(mean, name).search_event(GAUSSIAN)
    expected = rdp.compute_epsilon([order], [by_hand], DELTA)[0]
    assert one_order_epsilon(search, order) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mean", [3.0, 10.0])
@pytest.mark.parametrize("order", ORDERS)
def test_poisson_bound_is_theorem_6(mean, order):
    # eps' = eps + mean * delta_hat + log(mean) / (lambda - 1), delta_hat the trial's delta at log(1 + 1/(lambda - 1)).
    epsilon = gaussian_rdp(order)
    delta_hat, _ = rdp.compute_delta([order], [epsilon], math.log1p(1 / (order - 1)))
    by_hand = epsilon + mean * delta_hat + math.log(mean) / (order - 1)
    search = search_cost.TrialCount(mean, "poisson").search_event(GAUSSIAN)
    assert one_order_epsilon(search, order) == pytest.approx(rdp.compute_epsilon([order], [by_hand], DELTA)[0])


def test_search_epsilon_over_every_order_is_theorem_2_minimised():
    # The library's accountant (default orders): Theorem 2 at each order lambda, lambda_hat minimising the
    # constant, RDP's monotonicity in the order applied, then converted.
    orders = np.array(rdp.DEFAULT_RDP_ORDERS, dtype=float)
    epsilons = orders / (2 * SIGMA**2)
    gamma, mean = tnb_gamma(1.0, 10.0), 10.0
    constant = 2 * np.min((1 - 1 / orders) * epsilons + math.log(1 / gamma) / orders)
    curve = epsilons + constant + math.log(mean) / (orders - 1)
    curve = np.minimum.accumulate(curve[::-1])[::-1]
    expected = rdp.compute_epsilon(orders, curve, DELTA)[0]
    assert search_cost.search_epsilon(GAUSSIAN, search_cost.TrialCount(mean, "geometric"), DELTA) == pytest.approx(
        expected
    )


@pytest.mark.parametrize("shape", ["geometric", "logarithmic", "poisson", "0.5", "fixed"])
def test_search_epsilon_grows_with_the_mean_number_of_trials(shape):
    trial = accounting.training_event(sampling_rate=0.01, noise_multiplier=1.0, steps=1000)
    epsilons = [
        search_cost.search_epsilon(trial, search_cost.TrialCount(m, shape), DELTA) for m in (1, 2, 3, 5, 10, 30, 100)
    ]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert (
        epsilons[0] > search_cost.search_epsilon(trial, search_cost.TrialCount(1, "fixed"), DELTA) or shape == "fixed"
    )


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_one_fixed_trial_costs_exactly_one_trial(accountant):
    trial = search_cost.trial_event(accounting.training_event(sampling_rate=0.05, noise_multiplier=1.2, steps=200), 5.0)
    alone = accounting.make_accountant(accountant).compose(trial).get_epsilon(DELTA)
    assert search_cost.search_epsilon(trial, search_cost.TrialCount(1, "fixed"), DELTA, accountant) == alone


def test_random_trial_counts_use_the_rdp_accountant():
    assert search_cost.TrialCount(3, "geometric").accountant("pld") == "rdp"
    assert search_cost.TrialCount(3, "fixed").accountant("pld") == "pld"


@pytest.mark.parametrize("shape", ["geometric", "logarithmic", "poisson", "0.5", "3"])
@pytest.mark.parametrize("mean", [3.0, 10.0])
def test_trial_counts_are_drawn_with_the_accounted_mean(shape, mean):
    count = search_cost.TrialCount(mean, shape)
    rng = np.random.default_rng(0)
    draws = np.array([count.draw(rng) for _ in range(20000)])
    assert draws.mean() == pytest.approx(mean, rel=0.04)
    assert draws.min() >= (0 if shape == "poisson" else 1)


@pytest.mark.parametrize("shape", [1e-9, 0.5, 3.0])
def test_truncated_negative_binomial_counts_follow_its_distribution(shape):
    """The drawn K against the exact pmf (a negative binomial conditioned on K >= 1), shapes near 0 included."""
    from scipy import stats

    count = search_cost.TrialCount(5.0, shape)
    gamma = count.halting_probability()
    rng = np.random.default_rng(1)
    draws = np.array([count.draw(rng) for _ in range(20000)])
    exact = stats.nbinom(shape, gamma)
    for k in range(1, 12):
        probability = exact.pmf(k) / exact.sf(0)
        assert np.mean(draws == k) == pytest.approx(probability, abs=4 * np.sqrt(probability / len(draws)) + 1e-3)


@pytest.mark.parametrize("shape", ["geometric", "logarithmic", "0.5", "3"])
@pytest.mark.parametrize("mean", [1.5, 3.0, 10.0, 100.0])
def test_trial_counts_are_drawn_no_heavier_than_accounted(shape, mean):
    # The bound uses log(1 / gamma_acc) and log(mean): the drawn gamma is at least gamma_acc, its mean at most mean.
    count = search_cost.TrialCount(mean, shape)
    gamma = count.halting_probability()
    assert gamma >= rdp._gamma_truncated_negative_binomial(count.shape_parameter, mean)
    assert rdp._truncated_negative_binomial_mean(gamma, count.shape_parameter) <= mean


def test_trial_count_and_score_refuse_bad_parameters():
    for mean, shape in ((0.5, "geometric"), (3, "binomial"), (3, -1.0), (2.5, "fixed"), (math.inf, "poisson")):
        with pytest.raises(PrivacyParameterError):
            search_cost.TrialCount(mean, shape)
    with pytest.raises(PrivacyParameterError, match="score_noise"):
        search_cost.score_event(0.0)


@pytest.mark.parametrize("key", ["training.epochs", "privacy.noise_multiplier", "training", "sampling", "model"])
def test_space_refuses_keys_that_set_the_privacy_event(key):
    with pytest.raises(ConfigError, match="privacy event"):
        tuning.SearchSpace({key: [1, 2]})


def test_space_draws_lists_and_ranges():
    space = tuning.SearchSpace(
        {
            "optimizer.learning_rate": {"log_uniform": [0.001, 0.1]},
            "training.seed": {"integers": [0, 3]},
            "model.input_norm": {"uniform": [0.5, 2.0]},
            "model.layers.4.clip_value": [0.001, 0.01],
        }
    )
    rng = np.random.default_rng(0)
    draws = [space.draw(rng) for _ in range(200)]
    assert all(0.001 <= d["optimizer.learning_rate"] <= 0.1 for d in draws)
    assert {d["training.seed"] for d in draws} == {0, 1, 2, 3}
    assert all(0.5 <= d["model.input_norm"] <= 2.0 for d in draws)
    assert {d["model.layers.4.clip_value"] for d in draws} == {0.001, 0.01}
    cfg = tuning.configure(config.load(DIGITS), draws[0])
    assert cfg.model.layers[4]["clip_value"] == draws[0]["model.layers.4.clip_value"]
    for bad in ({"a": []}, {"a": {"log_uniform": [0, 1]}}, {"a": {"uniform": [2, 1]}}, {"a": {"normal": [0, 1]}}):
        with pytest.raises(ConfigError, match="search space a"):
            tuning.SearchSpace(bad)


def test_carve_places_each_example_by_itself():
    # Removing one example removes it from its part and changes nothing else (add-or-remove-one on each part).
    digits = data.load("digits")
    carve = tuning.validation_carve(digits, 0.2)
    assert len(carve.x_train) + len(carve.x_test) == len(digits.x_train)
    assert 0.15 < len(carve.x_test) / len(digits.x_train) < 0.25
    for index in (0, 700, len(digits.x_train) - 1):
        removed = digits.x_train[index]
        fewer = dataclasses.replace(
            digits, x_train=np.delete(digits.x_train, index, 0), y_train=np.delete(digits.y_train, index, 0)
        )
        smaller = tuning.validation_carve(fewer, 0.2)
        for part, before, after in (
            ("fit", carve.x_train, smaller.x_train),
            ("validation", carve.x_test, smaller.x_test),
        ):
            kept = before[[not np.array_equal(x, removed) for x in before]]
            assert np.array_equal(after, kept), (index, part)


def test_a_trial_is_its_planned_run_then_its_noisy_score():
    statistics = "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}"
    cfg = config.load(DIGITS, ["training.epochs=2", statistics, *GIVEN_NOISE])
    policy, event = tuning.declared_trial_event(cfg, 1000, 5.0)
    assert policy == training.planned_policy(cfg, 1000, (20.0,))
    assert event == dp_accounting.ComposedDpEvent(
        [policy.ledger(2 * policy.steps_per_epoch), dp_accounting.GaussianDpEvent(5.0)]
    )
    assert tuning.declared_trial_event(cfg, 1000, None)[1] == policy.ledger(2 * policy.steps_per_epoch)


def test_a_trial_under_another_policy_aborts_the_search(tmp_path):
    cfg = config.load(DIGITS, ["training.epochs=2", *GIVEN_NOISE])
    policy = training.planned_policy(cfg, 1000)
    state = {**json.loads(json.dumps(policy.to_dict())), "steps": 2 * policy.steps_per_epoch}
    trial_dir = str(tmp_path)
    with open(os.path.join(trial_dir, "privacy.json"), "w") as handle:
        json.dump(state, handle)
    tuning._check_trial_policy(trial_dir, cfg, policy)
    for changed in ({"noise_multiplier": policy.noise_multiplier * 1.01}, {"steps": state["steps"] + 1}):
        with open(os.path.join(trial_dir, "privacy.json"), "w") as handle:
            json.dump({**state, **changed}, handle)
        with pytest.raises(NotPrivateError, match="another privacy policy"):
            tuning._check_trial_policy(trial_dir, cfg, policy)


SPACE = "optimizer.learning_rate: {log_uniform: [0.003, 0.03]}\nmodel.layers.4.clip_value: [0.001, 0.01]\n"
TINY = [
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}, {type: ClipGradient, clip_value: 0.001}]",
    "training.epochs=1",
    *GIVEN_NOISE,
]


def tune_args(tmp_path, *extra):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = ["tune", DIGITS, "--space", str(space), "--out", str(tmp_path / "tune"), *extra]
    return args + [a for s in TINY for a in ("--set", s)]


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.kind=shuffle", "needs Poisson sampling"),
        ("sampling.seed=3", "fresh randomness"),
        ("dataset.validation_fraction=0.1", "carves its own validation part"),
    ],
)
def test_tune_refuses_settings_outside_the_bound(tmp_path, override, message):
    cfg = config.load(DIGITS, [override])
    with pytest.raises(ConfigError, match=message):
        tuning.tune(cfg, tuning.SearchSpace({}), search_cost.TrialCount(3), str(tmp_path / "tune"), verbose=0)
    assert not os.path.exists(tmp_path / "tune")


def test_tune_without_private_refuses(tmp_path, capsys):
    assert cli.main(tune_args(tmp_path, "--mean-trials", "3")) == 2
    assert "needs --private" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "tune")


def test_tune_one_fixed_trial_end_to_end(tmp_path, capsys):
    statistics = ("--set", "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}")  # a release before steps
    assert cli.main(tune_args(tmp_path, "--private", "--shape", "fixed", "--mean-trials", "1", *statistics)) == 0
    out = tmp_path / "tune"
    assert sorted(os.listdir(out)) == ["config.yaml", "model.keras", "statement.txt", "tune.json"]
    record = json.loads((out / "tune.json").read_text())
    model = keras.models.load_model(str(out / "model.keras"))
    assert record["epsilon"] == record["trial_epsilon"] == model.epsilon()  # one fixed trial costs exactly one run
    assert record["score"] is None  # nothing to select, nothing scored
    run_event = record["trial_event"]
    assert run_event == ledger_to_json(model.privacy.ledger(model.steps_taken))  # every release of the run
    assert run_event["events"][0] == {"class_name": "GaussianDpEvent", "noise_multiplier": 20.0}
    selected = config.load(str(out / "config.yaml"))
    assert selected.optimizer.learning_rate == record["selected"]["optimizer.learning_rate"]
    assert selected.dataset.name == "digits"
    printed = capsys.readouterr().out
    assert "for the whole hyper-parameter search" in printed and "Not released" in printed
    assert cli.main(tune_args(tmp_path, "--private", "--shape", "fixed", "--mean-trials", "1")) == 2


def saved_metric_states(model_path):
    """The metric variables stored in a ``.keras`` file (name: sum of its values)."""
    states = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            states[name] = float(np.sum(item[()]))

    with zipfile.ZipFile(model_path) as archive, archive.open("model.weights.h5") as weights:
        with h5py.File(weights, "r") as h5:
            if "metrics" in h5:
                h5["metrics"].visititems(collect)
    return states


def test_the_released_model_holds_no_validation_counts(tmp_path):
    # The last evaluation of a trial is on the private validation part: metric states saved with the model
    # (correct predictions, summed loss, certified counts) would publish its exact validation accuracy.
    assert cli.main(tune_args(tmp_path, "--private", "--shape", "fixed", "--mean-trials", "1")) == 0
    states = saved_metric_states(str(tmp_path / "tune" / "model.keras"))
    assert not any(states.values()), states


@pytest.mark.slow
def test_tune_random_trials_through_the_api(tmp_path):
    cfg, count = config.load(DIGITS, TINY), search_cost.TrialCount(3, "geometric")
    space = tuning.SearchSpace(yaml.safe_load(SPACE))
    result = tuning.tune(cfg, space, count, str(tmp_path / "tune"), verbose=0)
    record = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert record == json.loads(json.dumps(result.record))
    trial = ledger_from_json(record["trial_event"])
    assert result.epsilon == search_cost.search_epsilon(trial, count, record["delta"]) > record["trial_epsilon"]
    assert record["search_event"]["class_name"] == "RepeatAndSelectDpEvent"
    assert record["trial_event"]["events"][1] == {"class_name": "GaussianDpEvent", "noise_multiplier": 5.0}
    assert "trials" not in record and record["selected"] is not None  # K is never written
    digits = data.load("digits")
    assert result.model.evaluate(digits.x_test, digits.y_test, verbose=0)[1] > 0.1


def test_shipped_space_fits_the_digits_config():
    space = tuning.SearchSpace.load(os.path.join(ROOT, "configs", "spaces", "digits.yaml"))
    tuning.configure(config.load(DIGITS), space.draw(np.random.default_rng(0)))


def test_a_search_without_trials_releases_only_its_record(tmp_path, monkeypatch):
    # Poisson K may be 0: the record and statement are written, no model (that outcome is covered too).
    monkeypatch.setattr(search_cost.TrialCount, "draw", lambda self, rng: 0)
    cfg = config.load(DIGITS, TINY)
    result = tuning.tune(cfg, tuning.SearchSpace({}), search_cost.TrialCount(3, "poisson"), str(tmp_path), verbose=0)
    assert result.model is None and result.record["selected"] is None
    assert sorted(os.listdir(tmp_path)) == ["statement.txt", "tune.json"]
    assert "No trial ran" in result.statement()
