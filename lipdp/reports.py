"""``lipdp report RUN_DIR``: an HTML and a Markdown report of a training run.

:func:`make_report` reads what ``lipdp train`` saved (see
:mod:`lipdp.training`) and writes ``RUN_DIR/report.html`` (self-contained,
figures embedded as base64 PNG) and ``RUN_DIR/report.md`` (figures as PNG
files beside it). Sections:

* the privacy statement (from ``privacy.json``) and epsilon against epochs;
* training curves: test (held-out) and train curves, the latter computed on
  private batches and not covered by the guarantee;
* the sensitivity report (clipless runs): per layer, the bounds of
  :func:`lipdp.sensitivity.propagate` and the noise std of each variable,
  and the gradient-to-noise ratio logged during training by
  :class:`lipdp.callbacks.GradientNoiseMonitor` on *held-out* data;
* bound tightness: the largest true / bound ratio of per-sample gradient
  norms on test samples (as :func:`lipdp.verification.verify_bounds`, per
  layer), which must not exceed 1;
* calibration: expected calibration error (:func:`lipdp.calibration.expected_calibration_error`)
  and a reliability diagram on the test set;
* certified robustness: certified accuracy against the l2 radius on the test
  set, a table at ``evaluation.certified_radii`` (:mod:`lipdp.robustness`);
* the membership-inference audit (:mod:`lipdp.audit`), read from
  ``audit.json`` or computed;
* the one-run canary audit (:mod:`lipdp.canaries`), when
  ``canary_audit.json`` is present (``lipdp audit-canaries``); left out of
  public reports (a run on the private data, not covered).

Everything computed here from data uses the test split (held out, not
private), except two sections that are **not covered by the guarantee** and
say so in a warning at their top: the train curves (losses and accuracy on
private batches) and the membership-inference audit (it reads the training
records). ``make_report(..., public=True)`` (``lipdp report --public``)
leaves both out and writes ``public-report.html`` / ``public-report.md``
(figures prefixed ``public-``), which hold only what the weights' guarantee
and held-out data cover.
Figures use matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

import os

import numpy as np

from lipdp import runs
from lipdp.calibration import expected_calibration_error, new_figure, plot_reliability, predicted_probabilities
from lipdp.report_blocks import (
    figure_block,
    heading,
    not_covered,
    paragraph,
    render_html,
    render_markdown,
    table,
    warning,
)

TOLERANCE = 1e-5  # a true/bound ratio above 1 + TOLERANCE is a bound violation


# -- sensitivity --------------------------------------------------------------------
def sensitivity_rows(model):
    """:func:`lipdp.sensitivity.bound_rows` plus the noise std on the gradient sum and on the averaged gradient."""
    from lipdp import sensitivity

    views = sensitivity.mechanism_views(model)
    records = sensitivity.propagate(model, views)
    bounds = sensitivity.gradient_bound_tensors(model, records, views)
    stds = {v.ref(): float(s) for v, s in zip(model.trainable_variables, model.noise_stddevs(bounds))}
    batch = model.privacy.expected_batch_size
    rows = []
    for cells, variable in sensitivity.bound_rows(model, records, views):
        std = None if variable is None else stds[variable.ref()]
        noise = ["-", "-"] if std is None else [sensitivity.format_bound(std), sensitivity.format_bound(std / batch)]
        rows.append(cells + noise)
    return rows


def sensitivity_header():
    from lipdp import sensitivity

    return sensitivity.BOUND_HEADER + ["noise std (gradient sum)", "noise std (averaged gradient)"]


def bound_tightness(model, x, y, samples=128):
    """:func:`lipdp.verification.verify_bounds` on the first ``samples`` (held-out) examples."""
    from lipdp import verification

    return verification.verify_bounds(model, x[:samples], y[:samples], rtol=TOLERANCE)


# -- figures ----------------------------------------------------------------------------
def _epochs(history):
    return np.asarray(history["epoch"]) + 1


def _epoch_axis(axes):
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_series(history, series, ylabel, title):
    """``series``: ``[(column, label, style)]`` against epochs; missing columns are skipped."""
    figure = new_figure()
    axes = figure.add_subplot()
    for column, label, style in series:
        if column in history:
            axes.plot(_epochs(history), history[column], style, label=label)
    _epoch_axis(axes)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=7)
    return figure


def plot_training_curves(history, public=False):
    """Loss and accuracy, train (private; left out when ``public``) and test (held out), side by side."""
    figure = new_figure(9.0, 3.4)
    for position, metric in enumerate(("loss", "accuracy")):
        axes = figure.add_subplot(1, 2, position + 1)
        series = [(metric, "train (private batches, not covered)", "--")] if not public else []
        for column, label, style in series + [(f"val_{metric}", "test (held out)", "-")]:
            if column in history:
                axes.plot(_epochs(history), history[column], style, label=label)
        _epoch_axis(axes)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    return figure


# -- sections -------------------------------------------------------------------------
PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "sampling_rate",
    "sampling",
    "expected_batch_size",
    "steps",
    "steps_per_epoch",
    "dataset_size",
    "accountant",
    "noise_allocation",
)


def format_value(value):
    """How privacy.json values appear in the report (floats to 6 significant digits)."""
    return format(value, ".6g") if isinstance(value, float) else str(value)


def privacy_section(run):
    blocks = [
        heading("Privacy guarantee"),
        paragraph(run.model.privacy_statement()),
        table(["quantity", "value"], [(k, format_value(run.privacy[k])) for k in PRIVACY_KEYS if k in run.privacy]),
    ]
    if "epsilon" in run.history:
        blocks.append(
            figure_block(
                "report-epsilon.png",
                plot_series(
                    run.history, [("epsilon", "epsilon", "o-")], "epsilon", f"delta = {run.privacy['delta']:.3g}"
                ),
                "Epsilon spent against epochs (privacy accountant).",
            )
        )
    return blocks


def training_section(run, public=False):
    metrics = run.metrics
    summary = (
        f"Final test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4g} "
        f"on {metrics['test_size']} held-out examples ({metrics['data']})."
    )
    if public:
        return [
            heading("Test curves"),
            paragraph(summary),
            figure_block(
                "report-training.png",
                plot_training_curves(run.history, public=True),
                "Loss and accuracy against epochs on the test set (held out).",
            ),
        ]
    return [
        heading("Training curves"),
        not_covered(),
        paragraph(
            f"{summary} Train curves are computed on private batches during training and are not "
            "covered by the privacy guarantee: do not publish them."
        ),
        figure_block(
            "report-training.png",
            plot_training_curves(run.history),
            "Loss and accuracy against epochs: train (private, dashed) and test (held out, solid).",
        ),
    ]


def sensitivity_section(run):
    model = run.model
    blocks = [heading("Sensitivity")]
    if not run.certified:
        blocks.append(
            paragraph(
                f"Clipping run ({model.mechanism.describe()}): per-sample "
                "gradients are clipped, so there are no analytic per-layer bounds to report and no bound tightness "
                "to check."
            )
        )
    else:
        blocks += [
            paragraph(
                "Per-layer certified bounds for the trained weights (float64). The noise std is given per "
                "coordinate on the gradient sum, and on the averaged gradient the optimizer sees (the sum's std "
                f"divided by the expected batch size qN = {model.privacy.expected_batch_size:.1f})."
            ),
            table(sensitivity_header(), sensitivity_rows(model)),
        ]
    blocks += gradient_noise_blocks(run.history)
    return blocks


def gradient_noise_blocks(history):
    if "heldout_grad_to_noise" not in history:
        return [paragraph("Gradient-to-noise ratio: not recorded by this run (no heldout_grad_to_noise column).")]
    ratios = history["heldout_grad_to_noise"]
    return [
        paragraph(
            "Gradient-to-noise ratio: norm of the batch gradient sum over the expected norm of the added noise, "
            "measured on a held-out (test) batch of the expected batch size at each epoch end, so it costs no "
            f"privacy. Last epoch: {ratios[-1]:.4g}; range {np.nanmin(ratios):.4g} to {np.nanmax(ratios):.4g}."
        ),
        figure_block(
            "report-grad-noise.png",
            plot_series(
                history,
                [("heldout_grad_to_noise", "held-out gradient / noise", "o-")],
                "ratio",
                "gradient-to-noise ratio (held-out data)",
            ),
            "Gradient-to-noise ratio against epochs (held-out data).",
        ),
    ]


def tightness_section(run, samples):
    if not run.certified:
        return []
    dataset = run.dataset()
    return tightness_blocks(
        bound_tightness(run.model, dataset.x_test, dataset.y_test, samples), min(samples, len(dataset.x_test))
    )


def tightness_blocks(result, n):
    """The bound-tightness section for a :class:`lipdp.verification.Verification` on ``n`` held-out examples."""
    blocks = [
        heading("Bound tightness"),
        paragraph(
            f"Largest true / bound ratio of per-sample gradient norms over {n} test examples (held "
            f"out) and all variables: {result.max_ratio:.6g} (must be <= 1)."
        ),
        table(["variable", "worst true / bound"], [(k, f"{v:.6g}") for k, v in result.ratios.items()]),
    ]
    if not result.ok:
        blocks.insert(
            1,
            warning(
                f"BOUND VIOLATED: a true per-sample gradient norm exceeds its certified bound "
                f"(ratio {result.max_ratio:.6g} > 1 + {TOLERANCE:g}); the privacy guarantee "
                f"does not hold. Violations: {result.violations[:5]}"
            ),
        )
    return blocks


def calibration_section(run, bins=15):
    dataset = run.dataset()
    probs = predicted_probabilities(run.model, dataset.x_test)
    ece = expected_calibration_error(probs, dataset.y_test, bins)
    tau = getattr(run.model.loss, "tau", None)
    source = (
        f"softmax(tau * logits) with tau = {tau:g}, the loss's temperature"
        if tau is not None
        else f"softmax(logits) (the loss, {type(run.model.loss).__name__}, has no temperature: a convention)"
    )
    return [
        heading("Calibration"),
        paragraph(
            f"Expected calibration error on the test set ({len(probs)} examples, {bins} equal-width "
            f"confidence bins): ECE = {ece:.4f}. Probabilities are {source}. DP training is known to "
            "harm calibration (Bu et al. 2021)."
        ),
        figure_block(
            "report-reliability.png",
            plot_reliability(probs, dataset.y_test, bins),
            "Reliability diagram on the test set.",
        ),
    ]


def robustness_section(run, points=60):
    """Certified accuracy against the l2 radius on the test set (:mod:`lipdp.robustness`)."""
    from lipdp import config, robustness

    dataset = run.dataset()
    accuracy, certificate, per_example = robustness.example_radii(run.model, dataset.x_test, dataset.y_test)
    blocks = [heading("Certified robustness")]
    if not certificate.certified:
        return blocks + [paragraph(f"Not certified: {certificate.reason}. Test accuracy {accuracy:.4f}.")]
    radii = config.certified_radii(run.config)
    grid = np.linspace(0.0, max(float(per_example.max(initial=0.0)), max(radii)) * 1.05, points)
    figure = new_figure()
    axes = figure.add_subplot()
    axes.plot(grid, robustness.fraction_certified(per_example, grid), "-")
    axes.set_xlabel("l2 radius (model input units)")
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    rows = [(f"{r:g}", f"{a:.4f}") for r, a in zip(radii, robustness.fraction_certified(per_example, radii))]
    return blocks + [
        paragraph(
            f"The model's certified l2 Lipschitz constant from its input to its logits is {certificate.lipschitz:.6g} "
            f"(product of the layers' constants for the trained weights). A test example counts at radius r when it "
            f"is classified correctly with a logit margin above sqrt(2) L r: no perturbation of l2 norm <= r can "
            f"change its prediction. Test accuracy {accuracy:.4f} on {len(per_example)} examples (held out)."
        ),
        table(["radius", "certified accuracy"], rows),
        figure_block("report-certified.png", figure, "Certified accuracy against the l2 radius on the test set."),
    ]


def audit_section(result):
    blocks = [
        heading("Empirical privacy audit (membership inference)"),
        not_covered(),
        paragraph(
            f"Attacks of tensorflow_privacy's membership-inference tools ({result['backend']} backend) on "
            f"{result['members']} training examples (members) against {result['nonmembers']} test examples "
            f"(non-members). (epsilon, delta) = ({result['epsilon']:.4g}, {result['delta']:.3g}) bounds the attacker's "
            f"advantage by (e^eps - 1 + 2 delta) / (e^eps + 1) = {result['advantage_bound']:.4f} and the AUC by "
            f"{result['auc_bound']:.4f}; an attack is flagged if it exceeds them by more than the sampling margin "
            f"(advantage {result['margins']['advantage']:.3f}, AUC {result['margins']['auc']:.3f}). The bounds assume "
            "members and non-members come from the same distribution: a train/test split in file order (e.g. "
            "MNIST's t10k split 8,000/2,000, whose last images are harder) breaks this, and an attack can then "
            f"exceed them without any privacy bug (data: {result.get('data', 'not recorded')}). The audit reads "
            "the private training data: its numbers are a diagnostic and are not covered by the guarantee."
        ),
        table(
            ["attack", "AUC", "advantage", "AUC bound", "advantage bound", "exceeds bound"],
            [
                (
                    name,
                    f"{a['auc']:.4f}",
                    f"{a['advantage']:.4f}",
                    f"{result['auc_bound']:.4f}",
                    f"{result['advantage_bound']:.4f}",
                    "YES" if a["exceeds_bound"] else "no",
                )
                for name, a in result["attacks"].items()
            ],
        ),
    ]
    if result["exceeds_bound"]:
        blocks.insert(
            2,
            warning(
                "A membership-inference attack exceeds what (epsilon, delta)-DP allows beyond the "
                "sampling margin: this indicates a bug in the privacy machinery."
            ),
        )
    return blocks


def canary_section(result):
    """The one-run canary audit (:mod:`lipdp.canaries`), from ``canary_audit.json``."""
    blocks = [
        heading("Empirical privacy audit (one-run canaries)"),
        not_covered(),
        paragraph(
            f"A separate training run of this config with {result['canaries']} {result['kind']} canaries, each "
            f"included with probability 1/2 (Steinke, Nasr & Jagielski 2023): {result['correct']} of "
            f"{result['guesses']} membership guesses were right, which proves epsilon >= "
            f"{result['epsilon_lower_bound']:.4g} at {result['confidence']:.0%} confidence (delta = "
            f"{result['delta']:.3g}), against the claimed {result['epsilon_claimed']:.4g} (all guesses right would "
            f"have shown {result['epsilon_ceiling']:.4g}). A lower bound below the claim proves no privacy; one above "
            "it shows a bug."
        ),
    ]
    if result["exceeds_claim"]:
        blocks.insert(2, warning("The canary lower bound exceeds the claimed epsilon: the claim is wrong."))
    return blocks


def _audit_result(run, audit):
    from lipdp import audit as audit_lib

    if os.path.exists(runs.path(run.path, runs.AUDIT)):
        return runs.read_json(run.path, runs.AUDIT)
    return audit_lib.audit_run(run) if audit else None


def report_blocks(run, audit=True, tightness_samples=128, public=False):
    """All sections of the report for a loaded :class:`lipdp.runs.Run` (``public``: only what the guarantee covers)."""
    blocks = privacy_section(run) + training_section(run, public) + sensitivity_section(run)
    blocks += tightness_section(run, tightness_samples) + calibration_section(run) + robustness_section(run)
    result = None if public else _audit_result(run, audit)
    if result is not None:
        blocks += audit_section(result)
    if not public and os.path.exists(runs.path(run.path, runs.CANARY_AUDIT)):
        blocks += canary_section(runs.read_json(run.path, runs.CANARY_AUDIT))
    if public:
        for block in blocks:
            if block.kind == "figure":
                block.name = f"public-{block.name}"
    return blocks


def make_report(run_dir, audit=True, data_dir=None, tightness_samples=128, public=False):
    """Writes ``report.html``, ``report.md`` and its PNG figures into ``run_dir``; returns their paths.

    ``audit``: run the membership-inference audit (and write ``audit.json``)
    when the run has none yet. ``public``: leave out the sections computed
    from private training records (train curves, audit) and write
    ``public-report.html`` / ``public-report.md`` instead.
    """
    run = runs.load_run(run_dir, data_dir=data_dir)
    blocks = report_blocks(run, audit=audit, tightness_samples=tightness_samples, public=public)
    title = f"lipdp {'public ' if public else ''}run report: {os.path.basename(os.path.abspath(run_dir))}"
    prefix = "public-" if public else ""
    paths = {"html": os.path.join(run_dir, f"{prefix}report.html"), "md": os.path.join(run_dir, f"{prefix}report.md")}
    with open(paths["html"], "w") as handle:
        handle.write(render_html(blocks, title))
    with open(paths["md"], "w") as handle:
        handle.write(render_markdown(blocks, title))
    for block in blocks:
        if block.kind == "figure":
            with open(os.path.join(run_dir, block.name), "wb") as handle:
                handle.write(block.png)
            paths[block.name] = os.path.join(run_dir, block.name)
    return paths
