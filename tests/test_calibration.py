"""Calibration: expected calibration error and the loss-temperature probabilities."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import calibration


def test_ece_is_zero_for_confident_correct_predictions():
    labels = np.array([0, 1, 2, 1])
    assert calibration.expected_calibration_error(np.eye(3)[labels], labels) == 0.0
    assert calibration.expected_calibration_error(np.eye(3)[labels], np.eye(3)[labels]) == 0.0  # one-hot labels


def test_ece_on_a_hand_computed_case():
    # confidences 0.95, 0.95 (one right) and 0.65, 0.65 (both right), in two different bins:
    # ECE = 1/2 |0.5 - 0.95| + 1/2 |1 - 0.65| = 0.225 + 0.175 = 0.4
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    # a single bin with every prediction: |accuracy - mean confidence| = |0.75 - 0.8|
    assert calibration.expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.05)


def test_ece_matches_a_direct_loop_over_bins():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=500)
    labels = rng.integers(0, 10, 500)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            expected += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_probabilities_use_the_loss_temperature():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(4)])
    model.compile(loss=lipdp.losses.TauCategoricalCrossentropy(tau=5.0))
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    expected = tf.nn.softmax(5.0 * model(x)).numpy()
    np.testing.assert_allclose(calibration.predicted_probabilities(model, x), expected, rtol=1e-5, atol=1e-7)
