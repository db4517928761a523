"""The certified bounds against true per-sample gradients: exact verification and an adversarial search.

Test instruments for :mod:`lipdp.sensitivity` (and the reports' bound-tightness
section): each example's gradient is computed on its own, independently of
the bound propagation.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from lipdp.sensitivity import gradient_bound_tensors, model_loss, variable_names


def _single_sample_gradients(model, loss, sample):
    """Gradients of one sample's loss (a batch of one) w.r.t. the trainable variables.

    A batch of one is safe for every lipdp layer: the one TensorFlow 2.15
    kernel known to corrupt the heap on it (oneDNN ``Conv2DBackpropFilter``
    with a 1x1 kernel and strides (1, 2) or (2, 1), fuzz seed 102) is avoided
    by :class:`lipdp.layers.LipschitzConv2D` itself, as training needs too.
    """
    xi, yi = sample
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(loss.call(yi[None], model(xi[None], training=True)))
    return tape.gradient(value, model.trainable_variables)


def per_sample_gradient_norms(model, x, y):
    """True per-sample gradient norms, shape ``(batch, num_variables)`` (float64).

    Differentiates the unreduced loss of each sample alone: one graph per
    sample (:func:`_single_sample_gradients`), called sample after sample;
    shares nothing with the bound code. Not ``tf.vectorized_map``: the ops it cannot vectorise (e.g.
    ``Conv2DBackpropFilter``, ``TopKV2``, ``ScatterNd``) fall back to a
    ``tf.while_loop`` with parallel iterations, where one op kernel runs for
    several samples at once, and TensorFlow's oneDNN convolution kernels are
    not safe for that (see :func:`worst_case_inputs`): a crash under CPU
    contention.
    """
    loss = model_loss(model)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.float32)
    if not x.shape[0]:
        return tf.zeros([0, len(model.trainable_variables)], tf.float64)

    @tf.function(input_signature=[tf.TensorSpec(x.shape[1:], tf.float32), tf.TensorSpec(y.shape[1:], tf.float32)])
    def one_sample(xi, yi):
        grads = _single_sample_gradients(model, loss, (xi, yi))
        return tf.stack([tf.norm(tf.reshape(tf.cast(g, tf.float64), [-1])) for g in grads])

    return tf.stack([one_sample(x[i], y[i]) for i in range(x.shape[0])])


@dataclasses.dataclass
class Verification:
    """Result of :func:`verify_bounds`."""

    max_ratio: float
    ratios: dict
    violations: list

    @property
    def ok(self):
        return not self.violations


def verify_bounds(model, x, y, rtol=1e-5):
    """Compares true per-sample gradient norms with the bounds.

    Returns :class:`Verification` with ``max_ratio`` (true / bound, worst over
    samples and variables), ``ratios`` (worst ratio per variable) and
    ``violations``: ``(variable name, sample index, true norm, bound)`` for
    every case where the true norm exceeds ``bound * (1 + rtol)``.
    """
    bounds = np.array([float(b) for b in gradient_bound_tensors(model)])
    norms = per_sample_gradient_norms(model, x, y).numpy()
    ratios = norms / np.maximum(bounds, 1e-300)
    names = variable_names(model)
    violations = [
        (names[j], int(i), float(norms[i, j]), float(bounds[j]))
        for i, j in zip(*np.nonzero(norms > bounds * (1 + rtol)))
    ]
    worst = ratios.max(axis=0) if len(norms) else np.zeros(len(names))
    return Verification(float(worst.max(initial=0.0)), dict(zip(names, worst.tolist())), violations)


def worst_case_inputs(model, x, y, steps=30, step_size=0.5):
    """Gradient ascent on the inputs to maximise the per-sample gradient norm.

    Maximises the sum over samples of the squared total per-sample gradient
    norm, with per-sample normalised ascent steps scaled to the mean input
    norm. Used to look for adversarial violations of the bounds.

    Each sample's ascent direction comes from one graph on that sample
    (:func:`_single_sample_gradients`), called sample after sample: no ``tf.map_fn`` / ``tf.while_loop`` around
    the double backprop. In a loop with parallel iterations one op kernel
    runs for several samples at once, and TensorFlow's oneDNN fused
    convolution (``Conv2D + BiasAdd + Add``, e.g. a residual branch) keeps the
    summand's buffers in kernel members, unguarded: concurrent iterations
    free each other's buffers, a segmentation fault under CPU contention.

    A sample whose ascent direction is not finite (a second derivative
    ``0 * inf`` at a kink of a flat objective) takes no step: the inputs
    returned are always finite.
    """
    loss = model_loss(model)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.float32)
    scale = tf.reduce_mean(tf.norm(tf.reshape(x, [x.shape[0], -1]), axis=1)) + 1e-6

    @tf.function(input_signature=[tf.TensorSpec(x.shape[1:], tf.float32), tf.TensorSpec(y.shape[1:], tf.float32)])
    def unit_ascent_direction(xi, yi):
        with tf.GradientTape() as outer:
            outer.watch(xi)
            grads = _single_sample_gradients(model, loss, (xi, yi))
            objective = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
        direction = outer.gradient(objective, xi)
        # A second derivative can be 0 * inf = NaN where the objective is flat (e.g. a dead network whose
        # logits are exactly 0, where KCosineSimilarity's norm is not differentiable): that sample stays put.
        direction = tf.where(tf.reduce_all(tf.math.is_finite(direction)), direction, tf.zeros_like(direction))
        return direction / tf.maximum(tf.norm(tf.reshape(direction, [-1])), 1e-12)

    for _ in range(steps if x.shape[0] else 0):
        directions = tf.stack([unit_ascent_direction(x[i], y[i]) for i in range(x.shape[0])])
        x = x + step_size * scale * directions
    return x.numpy()
