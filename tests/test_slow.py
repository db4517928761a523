"""Long checks, run by `make test-slow` (not in the default suite)."""

import json
import os

import pytest
from test_sensitivity import ARCHITECTURES, build, check, data, train_a_few_steps

from lipdp import cli, verification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_adversarial_search_finds_no_violation(name, seed):
    model = build(name, seed=seed)
    x, y = data(model, n=24, seed=seed)
    train_a_few_steps(model, x, y, steps=20)
    check(model, verification.worst_case_inputs(model, x, y, steps=100, step_size=0.3), y, f"{name}/long ascent")


def test_default_job_learns(tmp_path):
    out = str(tmp_path / "digits")
    assert cli.main(["train", os.path.join(ROOT, "configs", "digits.yaml"), "--out", out, "--verbose", "0"]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    privacy = json.load(open(os.path.join(out, "privacy.json")))
    assert privacy["epsilon"] <= 4.0
    assert metrics["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
