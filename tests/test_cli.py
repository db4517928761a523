"""The command line: train writes the run folder; privacy prints epsilon / noise."""

import json
import os
import re

import pytest
import tensorflow as tf

from lipdp import accounting, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
SMALL = [
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}]",
    "training.epochs=2",
]


def test_train_writes_every_artefact_and_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in SMALL for a in ("--set", s)]
    assert cli.main(args) == 0
    for name in ("config.yaml", "history.csv", "model.keras", "sensitivity.txt", "privacy.json", "metrics.json"):
        assert os.path.exists(os.path.join(out, name)), name
    privacy = json.load(open(os.path.join(out, "privacy.json")))
    for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "sampling", "accountant"):
        assert key in privacy
    assert privacy["epsilon"] <= 4.0 and privacy["sampling"] == "poisson"
    assert privacy["steps"] == 2 * 6  # ceil(1437 / 256) = 6 steps per epoch
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    assert int(model.privacy_steps) == privacy["steps"]
    printed = capsys.readouterr().out
    assert "differentially private" in printed and "test accuracy" in printed
    assert cli.main(args) == 2
    assert "already holds a completed run" in capsys.readouterr().err


def test_train_config_typo_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", DIGITS, "--out", str(tmp_path / "r"), "--set", "privacy.delt=1e-5"])
    assert code == 2
    assert "privacy.delt: unknown key" in capsys.readouterr().err


def test_privacy_prints_epsilon_matching_the_accountant(capsys):
    cli.main(
        [
            "privacy",
            "--dataset-size",
            "60000",
            "--batch-size",
            "256",
            "--epochs",
            "10",
            "--noise-multiplier",
            "1.1",
            "--delta",
            "1e-5",
        ]
    )
    out = capsys.readouterr().out
    assert "2350 steps (235 per epoch)" in out  # ceil(60000 / 256) = 235, not round(234.375) = 234
    expected = accounting.compute_epsilon(sampling_rate=256 / 60000, noise_multiplier=1.1, steps=2350, delta=1e-5)
    assert f"epsilon = {expected:.6g}" in out


def test_privacy_calibrates_noise_for_a_target(capsys):
    cli.main(
        [
            "privacy",
            "--dataset-size",
            "60000",
            "--batch-size",
            "256",
            "--epochs",
            "10",
            "--target-epsilon",
            "2",
            "--delta",
            "1e-5",
        ]
    )
    sigma = float(re.search(r"noise multiplier = ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    args = dict(sampling_rate=256 / 60000, steps=2350, delta=1e-5)
    assert accounting.compute_epsilon(noise_multiplier=sigma, **args) <= 2.0
    assert accounting.compute_epsilon(noise_multiplier=sigma * 0.98, **args) > 2.0  # close to the smallest


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_privacy_composes_the_statistics_releases_a_run_makes(sampling, capsys):
    """A run with model.feature_statistics spends its release too: the calculator must count it when asked."""
    common = ["privacy", "--dataset-size", "1000", "--batch-size", "100", "--epochs", "3", "--delta", "1e-5"]
    cli.main(common + ["--sampling", sampling, "--noise-multiplier", "2", "--release", "8", "--release", "20"])
    printed = float(re.search(r"epsilon = ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    schedule = dict(sampling_rate=0.1, steps=30, delta=1e-5, sampling=sampling, steps_per_epoch=10)
    expected = accounting.compute_epsilon(noise_multiplier=2.0, releases=(8.0, 20.0), **schedule)
    assert printed == pytest.approx(expected, rel=1e-5)
    assert printed > accounting.compute_epsilon(noise_multiplier=2.0, **schedule) * 1.01


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.noise_multiplier=1.0", "exactly one of target_epsilon and noise_multiplier"),
        (
            "model.mechanism.name=flatt",
            r"model.mechanism: unknown gradient mechanism 'flatt' \(did you mean 'flat'\?\)",
        ),
        (
            "model.mechanism={name: flat, clip_nrom: 0.1}",
            "model.mechanism: gradient mechanism 'flat' takes clip_norm, gamma; unknown: clip_nrom",
        ),
        ("model.mechanism={name: flat, clip_norm: -1}", "model.mechanism: clip_norm must be a positive finite number"),
        ("sampling.kind=shufle", "sampling.kind: 'shufle'"),
        ("loss.params.taux=3", r"loss.params.taux: unknown key \(did you mean 'tau'"),
        ("sampling.batch_size=0", "sampling.batch_size: must be > 0"),
        ("privacy.accountant=prv", "privacy.accountant"),
        ("model.layers=[{type: Flatten}, {type: Dense, units: 10}]", "use lipdp.layers.LipschitzDense"),
    ],
)
def test_train_value_errors_are_clear_and_exit_2(tmp_path, capsys, override, message):
    code = cli.main(["train", DIGITS, "--out", str(tmp_path / "r"), "--verbose", "0", "--set", override])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_privacy_refuses_large_delta(capsys):
    code = cli.main(
        [
            "privacy",
            "--dataset-size",
            "100",
            "--batch-size",
            "10",
            "--epochs",
            "1",
            "--noise-multiplier",
            "1",
            "--delta",
            "0.05",
        ]
    )
    assert code == 2
    assert "delta" in capsys.readouterr().err


def test_a_budget_that_allows_no_step_is_a_clear_error(tmp_path, capsys):
    """PrivacyBudgetExhausted (a LipdpError) used to escape the CLI as a traceback."""
    args = ["train", DIGITS, "--out", str(tmp_path / "r"), "--verbose", "0", "--set", "privacy.epsilon_budget=0.0001"]
    assert cli.main(args) == 2
    assert "allows 0 steps" in capsys.readouterr().err
