"""One-run canary audit: the paper's test by hand, and gradient canaries' power, validity and a caught noise bug."""

import json
import math

import numpy as np
import pytest

import lipdp
from lipdp import canaries, cli, one_run_test, report_blocks, reports
from lipdp import data as lipdp_data
from lipdp import layers as L
from lipdp.backend import keras
from lipdp.errors import PrivacyParameterError


# -- the lower bound ----------------------------------------------------------------------
def logit(p):
    return math.log(p / (1 - p))


def test_all_correct_without_delta_is_the_binomial_closed_form():
    # v = r = 10, delta = 0: P[Binomial(10, p) >= 10] = p^10 <= 0.05 exactly at p = 0.05^(1/10)
    assert one_run_test.epsilon_lower_bound(10, 10, 10, 0.0) == pytest.approx(logit(0.05**0.1), abs=1e-5)
    # v = 9 of r = 10: p^10 + 10 p^9 (1 - p) = 0.05, solved here by bisection of the polynomial
    low, high = 0.5, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if middle**10 + 10 * middle**9 * (1 - middle) < 0.05 else (low, middle)
    assert low == pytest.approx(0.605837, abs=1e-6)
    assert one_run_test.epsilon_lower_bound(20, 10, 9, 0.0) == pytest.approx(logit(low), abs=1e-5)


def test_p_value_with_delta_matches_the_theorem_by_hand():
    # m = 4 canaries, r = v = 2 guesses right, delta = 0.01, p = e^eps / (1 + e^eps):
    # P[W' >= 2] = p^2; the max over i of P[2 - i <= W' < 2] / i: i = 1 gives 2 p (1 - p), i = 2 gives (1 - p^2) / 2
    epsilon, m, delta = 1.0, 4, 0.01
    p = 1 / (1 + math.exp(-epsilon))
    expected = p**2 + 2 * m * delta * max(2 * p * (1 - p), (1 - p**2) / 2)
    assert one_run_test.p_value(m, 2, 2, epsilon, delta) == pytest.approx(expected)
    assert one_run_test.p_value(m, 2, 2, epsilon, 0.0) == pytest.approx(p**2)


def test_lower_bound_sits_where_the_p_value_crosses_beta():
    m, r, v, delta = 1000, 200, 180, 1e-5
    bound = one_run_test.epsilon_lower_bound(m, r, v, delta)
    assert one_run_test.p_value(m, r, v, bound, delta) <= 0.05 < one_run_test.p_value(m, r, v, bound + 1e-3, delta)
    assert one_run_test.epsilon_lower_bound(m, r, v, delta, confidence=0.99) < bound
    assert one_run_test.epsilon_lower_bound(m, r, v, 1e-3) < bound  # a larger delta allows more correct guesses


def test_chance_level_guesses_prove_nothing():
    assert one_run_test.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert one_run_test.epsilon_lower_bound(1000, 200, 0, 1e-5) == 0.0
    with pytest.raises(PrivacyParameterError):
        one_run_test.epsilon_lower_bound(10, 20, 5, 1e-5)


def test_guesses_take_the_top_and_bottom_scores():
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, False, False, True, True])
    # top two (5, 4): canaries 0 (in, right) and 3 (out, wrong); bottom two (-3, -2): 1 (out, right), 4 (in, wrong)
    assert one_run_test.guess(scores, included, 4) == (4, 2)
    with pytest.raises(PrivacyParameterError):
        one_run_test.guess(scores, included, 8)


# -- gradient canaries: insertion and scores ------------------------------------------------
def test_drawn_included_canaries_add_their_norm_on_their_coordinate_and_score_one():
    import tensorflow as tf

    from lipdp.mechanisms import Sensitivity

    variables = [tf.zeros((3, 2)), tf.zeros((4,))]
    included = np.array([True, False, True, True, False])
    gradient = canaries.GradientCanaries(variables, included, np.array([0, 7, 5, 9, 2]), seed=0)
    sensitivity = Sensitivity.of_variables([tf.constant(3.0, tf.float64), tf.constant(4.0, tf.float64)])
    assert [float(n) for n in gradient.norms(sensitivity, "global")] == [5.0, 5.0]
    norms = gradient.norms(sensitivity, "per-layer")  # each variable's own bound
    assert [float(n) for n in norms] == [3.0, 4.0]
    sums = gradient.insert(variables, norms, rate=1.0)  # every included canary drawn
    flat = np.concatenate([np.ravel(s) for s in sums])
    assert flat.tolist() == [3, 0, 0, 0, 0, 3, 0, 0, 0, 4]  # canaries 0, 2 (first variable) and 3 (second)
    gradient.record(sums, norms)
    assert gradient.scores.numpy().tolist() == included.astype(float).tolist()
    assert np.all(np.ravel(gradient.insert(variables, norms, rate=0.0)[0]) == 0)  # none drawn


# -- gradient canaries on a small model ------------------------------------------------------
DIGITS = lipdp_data.load_digits()


class TenthNoise(lipdp.DPSequential):
    """Deliberately broken: adds a tenth of the noise its policy accounts for (a noise-calibration bug)."""

    def noise_stddevs(self, sensitivity_):
        return [0.1 * std for std in super().noise_stddevs(sensitivity_)]


def small_model(model_class=lipdp.DPSequential):
    keras.utils.set_random_seed(0)
    model = model_class(
        [
            keras.Input(DIGITS.input_shape),
            L.InputNormClip(1.0),
            L.Flatten(),
            L.LipschitzDense(64),
            L.GroupSort(),
            L.LipschitzDense(10),
            L.ClipGradient(0.001),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), loss=lipdp.losses.TauCategoricalCrossentropy(64.0))
    return model


def audit_small(seed, model_class=lipdp.DPSequential, epochs=5, **policy):
    sampler = lipdp.PoissonSampler(DIGITS.x_train, DIGITS.y_train, expected_batch_size=256)
    reference = (DIGITS.x_test, DIGITS.y_test)
    return canaries.gradient_audit(
        small_model(model_class), sampler, reference, epochs, 1000, guesses=200, seed=seed, delta=1e-5, **policy
    )


def test_gradient_canaries_find_a_large_bound_with_the_noise_nearly_off():
    result = audit_small(0, noise_multiplier=0.05)
    assert result["correct"] >= 195 and result["epsilon_lower_bound"] > 3.5  # the ceiling of r = 200 is ~4.2
    assert result["epsilon_claimed"] > 1000 and not result["exceeds_claim"]


@pytest.mark.slow
def test_gradient_canaries_stay_below_the_claim_over_seeds():
    for seed in range(4):
        result = audit_small(seed, target_epsilon=2.0)
        assert result["epsilon_claimed"] <= 2.0
        assert not result["exceeds_claim"] and result["epsilon_lower_bound"] < 2.0, result


def test_gradient_canaries_catch_a_model_adding_too_little_noise():
    result = audit_small(0, TenthNoise, target_epsilon=1.0)
    assert result["epsilon_claimed"] <= 1.0
    assert result["exceeds_claim"] and result["epsilon_lower_bound"] > 1.5, result


TINY = [
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}]",
    "training.epochs=1",
    "privacy.target_epsilon=null",
    "privacy.noise_multiplier=2.0",
]


def cli_args(command, out, *overrides):
    return [command, "configs/digits.yaml", "--out", str(out)] + [
        a for s in TINY + list(overrides) for a in ("--set", s)
    ]


def test_cli_writes_the_audit_of_a_config(tmp_path, capsys):
    out = tmp_path / "audit"
    assert cli.main(cli_args("audit-canaries", out) + ["--canaries", "200", "--seed", "0"]) == 0
    assert "epsilon lower bound" in capsys.readouterr().out
    result = json.loads((out / "canary_audit.json").read_text())
    assert result["kind"] == "gradient" and result["canaries"] == 200 and result["guesses"] == 40
    assert 0 <= result["correct"] <= 40 and result["epsilon_lower_bound"] <= result["epsilon_ceiling"]
    assert result["config"]["training"]["epochs"] == 1 and not result["exceeds_claim"]
    with pytest.raises(SystemExit):  # argparse refuses an unknown kind
        cli.main(cli_args("audit-canaries", out) + ["--canaries", "200", "--kind", "nope"])


def test_input_canaries_run_end_to_end_and_gradient_canaries_refuse_what_they_cannot_audit(tmp_path):
    assert cli.main(cli_args("audit-canaries", tmp_path / "in") + ["--canaries", "100", "--kind", "input"]) == 0
    result = json.loads((tmp_path / "in" / "canary_audit.json").read_text())
    assert result["kind"] == "input" and result["canaries"] == 100 and result["guesses"] == 20
    assert result["epsilon_lower_bound"] < result["epsilon_claimed"]
    assert cli.main(cli_args("audit-canaries", tmp_path / "sh", "sampling.kind=shuffle") + ["--canaries", "10"]) == 2
    assert cli.main(cli_args("audit-canaries", tmp_path / "big") + ["--canaries", "100000"]) == 2  # > parameters


def test_report_section_states_the_bound_and_flags_an_exceeded_claim():
    result = {"canaries": 1000, "kind": "gradient", "correct": 190, "guesses": 200, "epsilon_lower_bound": 3.2}
    result.update(confidence=0.95, delta=1e-5, epsilon_claimed=1.0, epsilon_ceiling=4.17, exceeds_claim=True)
    text = report_blocks.render_markdown(reports.canary_section(result), "t")
    assert "190 of 200 membership guesses" in text and "epsilon >= 3.2" in text and "the claim is wrong" in text
    result.update(epsilon_claimed=8.0, exceeds_claim=False)
    assert "the claim is wrong" not in report_blocks.render_markdown(reports.canary_section(result), "t")


@pytest.mark.slow
def test_cli_audits_a_config_next_to_its_run_and_the_report_shows_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args("train", out) + ["--verbose", "0"]) == 0
    assert cli.main(cli_args("audit-canaries", out) + ["--canaries", "200", "--seed", "0"]) == 0
    result = json.loads((out / "canary_audit.json").read_text())
    assert cli.main(["report", str(out), "--no-audit"]) == 0
    report = (out / "report.md").read_text()
    assert "one-run canaries" in report and f"{result['correct']} of 40 membership guesses" in report
    assert cli.main(["report", str(out), "--no-audit", "--public"]) == 0
    assert "canaries" not in (out / "public-report.md").read_text()
    # the folder's run was trained with 1 epoch: an audit of 2 epochs would be shown as its audit
    assert cli.main(cli_args("audit-canaries", out, "training.epochs=2") + ["--canaries", "200"]) == 2
    assert "another config" in capsys.readouterr().err
