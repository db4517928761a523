"""Calibration of a classifier's confidence: reliability bins and the expected calibration error (ECE)."""

import numpy as np


def calibration_bins(probs, labels, bins=15):
    """Per equal-width confidence bin ``((i/bins, (i+1)/bins]``, the first closed): confidence, accuracy, count.

    ``probs``: ``(n, classes)`` predicted probabilities; ``labels``: integer
    labels ``(n,)`` or one-hot ``(n, classes)``. Empty bins hold NaN.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    labels = labels.argmax(axis=-1) if labels.ndim == 2 else labels
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / counts
        accuracy = np.bincount(index, correct, bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(probs, labels, bins=15):
    """ECE: ``sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|`` over equal-width confidence bins.

    The confidence of a prediction is its largest probability; bin ``b``
    holds confidences in ``((b-1)/bins, b/bins]`` (0 falls in the first).
    """
    confidence, accuracy, counts = calibration_bins(probs, labels, bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - confidence[filled])) / counts.sum())


def predicted_probabilities(model, x, batch_size=512):
    """``softmax(tau * logits)``: the probabilities of the model's tau-CE loss (tau = 1 for other losses)."""
    logits = model.predict(x, batch_size=batch_size, verbose=0).astype(np.float64)
    scaled = loss_temperature(model) * logits
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def loss_temperature(model):
    """The loss's temperature ``tau`` (``TauCategoricalCrossentropy``), else 1."""
    return float(getattr(getattr(model, "loss", None), "tau", 1.0))


def new_figure(width=5.0, height=3.4):
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_reliability(probs, labels, bins=15):
    """Reliability diagram: accuracy per confidence bin against the diagonal."""
    confidence, accuracy, counts = calibration_bins(probs, labels, bins)
    figure = new_figure(4.2, 4.0)
    axes = figure.add_subplot()
    edges = np.linspace(0, 1, bins + 1)
    filled = counts > 0
    axes.bar(
        edges[:-1][filled],
        accuracy[filled],
        width=1 / bins,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    axes.plot(confidence[filled], accuracy[filled], "o", color="C3", markersize=3, label="(confidence, accuracy)")
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7, loc="upper left")
    return figure
