"""Shared references of the layer tests: explicit matrices and Jacobians, per-sample gradients, tightness logs."""

import logging
import math

import numpy as np
import pytest
import tensorflow as tf

log = logging.getLogger(__name__)

RTOL = 1e-5  # float32 forward pass vs float64 bounds
B64 = tf.float64


def f64(value):
    return tf.constant(value, B64)


def norms(batch):
    """Per-sample l2 norms (float64) of a batch array/tensor."""
    a = np.asarray(batch, np.float64)
    return np.linalg.norm(a.reshape(len(a), -1), axis=1)


def unit(batch):
    a = np.asarray(batch, np.float64)
    n = norms(a).reshape((-1,) + (1,) * (a.ndim - 1))
    return a / np.maximum(n, 1e-300)


def tightness(label, ratio):
    log.warning("tightness %-60s ratio=%.6f", label, ratio)


def explicit_matrix(layer, in_shape):
    """Matrix ``M`` (inputs x outputs) with ``layer(x) - layer(0) = x_flat @ M``."""
    n = math.prod(in_shape)
    basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(in_shape))
    zero = layer(np.zeros((1,) + tuple(in_shape), np.float32))
    return (layer(basis) - zero).numpy().reshape(n, -1).astype(np.float64)


def worst_output_inputs(matrix, offset, radius, iters=30):
    """Maximises ``||x M + offset||`` over ``||x|| = radius`` (power-like ascent)."""
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    starts = [u[:, 0], -u[:, 0]]
    found = []
    for x in starts:
        x = radius * x
        for _ in range(iters):
            g = matrix @ (x @ matrix + offset)
            x = radius * g / max(np.linalg.norm(g), 1e-300)
        found.append(x)
    return np.stack(found)


def nonzero_bias(layer, scale=10.0):
    """Pushes the bias to its norm ball's boundary (non-zero, random direction)."""
    layer.bias.assign(layer.bias_constraint(tf.random.normal(layer.bias.shape) * scale))
    assert np.linalg.norm(layer.bias.numpy()) == pytest.approx(layer.bias_bound, rel=1e-5)


def kernel_gradient(layer, x, z):
    """Per-sample kernel and bias gradients for cotangent ``z`` (one sample at a time)."""
    grads = []
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1], tf.float32)
        with tf.GradientTape() as tape:
            out = layer(xi)
        grads.append(
            tape.gradient(out, layer.trainable_variables, output_gradients=tf.constant(z[i : i + 1], tf.float32))
        )
    return grads


def assert_bias_gradient_bound_attained(layer, x, z, label):
    """A cotangent constant over positions makes ||grad b|| = sqrt(P) ||z||: the bound must hold and be attained."""
    ((_, g_bias),) = kernel_gradient(layer, x, z)
    _, (_, bias_bound) = layer.gradient_bounds(f64(norms(x)[0]), f64(norms(z)[0]))
    measured = np.linalg.norm(g_bias.numpy())
    assert measured <= float(bias_bound) * (1 + RTOL)
    assert measured == pytest.approx(float(bias_bound), rel=1e-4)
    tightness(label, measured / float(bias_bound))


def jacobian_matrices(layer, x):
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
    jac = tape.batch_jacobian(out, x).numpy().astype(np.float64)
    return jac.reshape(len(jac), math.prod(out.shape[1:]), -1)


def expected_overlap(kernel, strides):
    """Brute force: the most windows any input index lies in, per axis, multiplied."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    strides = (strides, strides) if isinstance(strides, int) else strides
    total = 1
    for k, s in zip(kernel, strides):
        total *= max(sum(1 for o in range(0, 64) if o * s <= i < o * s + k) for i in range(64))
    return total
