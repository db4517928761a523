"""``lipdp report``: files, embedded figures, numbers from privacy.json; the held-out gradient monitor."""

import base64
import io
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import cli, report_blocks, reports, runs, verification
from lipdp import layers as L
from lipdp.callbacks import GradientNoiseMonitor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
TINY = [
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}]",
    "training.epochs=2",
    "privacy.target_epsilon=null",
    "privacy.noise_multiplier=2.0",
]  # no calibration: RDP at q=0.18 is slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_tiny(out, *overrides):
    args = ["train", DIGITS, "--out", out, "--verbose", "0"]
    assert cli.main(args + [a for s in TINY + list(overrides) for a in ("--set", s)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = train_tiny(str(tmp_path_factory.mktemp("report") / "run"))
    assert cli.main(["report", out]) == 0
    return out


def read(path, mode="r"):
    with open(path, mode) as handle:
        return handle.read()


def test_report_files_exist_and_figures_are_valid_png(run_dir):
    from matplotlib import image

    markdown = read(os.path.join(run_dir, "report.md"))
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(figures) == 5  # epsilon, training curves, gradient/noise, reliability, certified accuracy
    for name in figures:
        data = read(os.path.join(run_dir, name), "rb")
        assert data.startswith(PNG_SIGNATURE), name
        assert image.imread(os.path.join(run_dir, name)).ndim == 3


def test_html_is_self_contained(run_dir):
    from PIL import Image

    page = read(os.path.join(run_dir, "report.html"))
    images = re.findall(r"src='([^']*)'", page)
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)
    for src in images:
        png = base64.b64decode(src.split(",", 1)[1])
        assert png.startswith(PNG_SIGNATURE)
        Image.open(io.BytesIO(png)).verify()


def test_report_numbers_are_those_of_privacy_json(run_dir):
    privacy = json.loads(read(os.path.join(run_dir, "privacy.json")))
    markdown, page = read(os.path.join(run_dir, "report.md")), read(os.path.join(run_dir, "report.html"))
    for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "sampling", "accountant"):
        value = reports.format_value(privacy[key])
        assert f"| {key} | {value} |" in markdown, key
        assert f"<td>{key}</td><td>{value}</td>" in page, key
    assert f"{privacy['epsilon']:.4g}, {privacy['delta']:.3g})-differentially private" in markdown


def test_report_sections_and_held_out_measurements(run_dir):
    markdown = read(os.path.join(run_dir, "report.md"))
    for title in (
        "Privacy guarantee",
        "Training curves",
        "Sensitivity",
        "Bound tightness",
        "Calibration",
        "Certified robustness",
        "Empirical privacy audit",
    ):
        assert f"## {title}" in markdown
    assert "not covered by the privacy guarantee" in markdown and "held-out (test) batch" in markdown
    assert "WARNING" not in markdown
    ratio = float(re.search(r"all variables: ([0-9.e+-]+) \(must be <= 1\)", markdown).group(1))
    assert 0 < ratio <= 1
    history = runs.read_history(os.path.join(run_dir, "history.csv"))
    assert np.all(np.isfinite(history["heldout_grad_to_noise"])) and np.all(history["heldout_grad_to_noise"] > 0)
    audit = json.loads(read(os.path.join(run_dir, "audit.json")))
    assert f"{audit['advantage_bound']:.4f}" in markdown


def test_sensitivity_table_noise_std_is_the_models(run_dir):
    run = runs.load_run(run_dir)
    model = run.model
    bounds = [float(b) for b in lipdp.sensitivity.gradient_bound_tensors(model)]
    assert run.privacy["noise_allocation"] == "global"  # one std: sigma * ||bounds||_2, on the sum
    expected = run.privacy["noise_multiplier"] * np.linalg.norm(bounds) / run.privacy["expected_batch_size"]
    rows = reports.sensitivity_rows(model)
    kernels = [row for row in rows if row[5] == "kernel"]
    assert len(kernels) == 2 and kernels[0][8] == f"{expected:.4g}"


def test_audit_command_writes_audit_json(run_dir, capsys):
    assert cli.main(["audit", run_dir, "--seed", "1"]) == 0
    result = json.loads(read(os.path.join(run_dir, "audit.json")))
    assert result["seed"] == 1 and set(result["attacks"]) == {"threshold", "logistic_regression"}
    assert "advantage" in capsys.readouterr().out


def test_report_of_a_clipping_run_skips_the_bound_sections(tmp_path):
    out = train_tiny(str(tmp_path / "clip"), "model.mechanism.name=flat", "training.epochs=1")
    assert cli.main(["report", out, "--no-audit"]) == 0
    markdown = read(os.path.join(out, "report.md"))
    assert "no analytic per-layer bounds" in markdown and "## Bound tightness" not in markdown
    assert "## Calibration" in markdown and "## Empirical privacy audit" not in markdown


def test_report_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a completed run" in capsys.readouterr().err


def test_violated_bounds_and_audits_beyond_the_bound_are_flagged():
    fine = verification.Verification(0.8, {"dense/kernel": 0.8}, [])
    broken = verification.Verification(1.2, {"dense/kernel": 1.2}, [("dense/kernel", 3, 1.2, 1.0)])
    assert not any(b.kind == "warning" for b in reports.tightness_blocks(fine, 10))
    assert "BOUND VIOLATED" in report_blocks.render_markdown(reports.tightness_blocks(broken, 10), "t")
    result = {
        "backend": "x",
        "members": 5,
        "nonmembers": 5,
        "epsilon": 1.0,
        "delta": 0.0,
        "advantage_bound": 0.46,
        "auc_bound": 0.7,
        "margins": {"advantage": 0.1, "auc": 0.1},
        "exceeds_bound": True,
        "attacks": {"threshold": {"auc": 0.99, "advantage": 0.9, "exceeds_bound": True}},
    }
    page = report_blocks.render_html(reports.audit_section(result), "t")
    assert "class='warning'" in page and "<td>YES</td>" in page


# -- the held-out gradient-to-noise monitor --------------------------------------------
def test_gradient_noise_monitor_is_inversely_proportional_to_the_noise():
    tf.keras.utils.set_random_seed(0)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((5,)),
            L.InputNormClip(1.0),
            L.LipschitzDense(6, bias_bound=0.5),
            L.GroupSort(),
            L.LipschitzDense(2),
        ]
    )
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype("float32")
    y = tf.one_hot((x[:, 0] > 0).astype(int), 2).numpy()
    sampler = lipdp.PoissonSampler(x[:100], y[:100], expected_batch_size=20)
    monitor = GradientNoiseMonitor(x[100:], y[100:])
    monitor.set_model(model)
    ratios = []
    for sigma in (1.0, 2.0):
        model.make_private(sampler, noise_multiplier=sigma)
        ratios.append(monitor.ratio())
    assert ratios[0] > 0 and ratios[0] == pytest.approx(2 * ratios[1], rel=1e-6)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs["heldout_grad_to_noise"] == pytest.approx(ratios[1])


def test_non_private_sections_are_marked_and_left_out_of_the_public_report(run_dir):
    """Train curves and the audit read private records: flagged in report.*, absent from public-report.*."""
    markdown = read(os.path.join(run_dir, "report.md"))
    assert markdown.count("Not covered by the privacy guarantee: this section") == 2  # train curves and audit
    assert "train (private" in read(os.path.join(run_dir, "report.html"))
    assert cli.main(["report", run_dir, "--public"]) == 0
    public_md = read(os.path.join(run_dir, "public-report.md"))
    public_html = read(os.path.join(run_dir, "public-report.html"))
    for page in (public_md, public_html):
        assert "not covered by the privacy guarantee" not in page.lower() and "membership" not in page.lower()
        assert "differentially private" in page  # the privacy statement is kept
    assert "public-report-training.png" in public_md
    assert os.path.exists(os.path.join(run_dir, "public-report-training.png"))
    run = runs.load_run(run_dir)
    public_blocks = reports.report_blocks(run, public=True, tightness_samples=4)
    assert not any(b.kind == "not_covered" for b in public_blocks)
