"""The bound protocol every DP layer implements, and certified norm helpers.

A layer of a clipless DP network states three bounds, all per sample and in
the l2 norm over every non-batch axis:

1. ``output_bound(b)``: a bound on ``||output||`` when ``||input|| <= b``;
2. ``input_cotangent_bound(c)``: a bound on the norm of the gradient with
   respect to the layer input when the gradient with respect to its output has
   norm ``<= c``. For most layers this is ``lipschitz_constant() * c``;
3. ``gradient_bounds(b, c)``: for each trainable variable, a bound on the norm
   of the per-sample gradient with respect to *that variable*.

Bounds are ``tf.float64`` scalars computed from the weights in use, never from
data, so the sensitivity calculator can evaluate them inside a train step.
Merge layers (several inputs) take and return lists instead of scalars.
"""

import math

import tensorflow as tf

from lipdp.errors import ModelNotSupportedError

#: Relative allowance :func:`lipdp.sensitivity.propagate` adds to every bound a
#: layer or loss states (output, cotangent and gradient bounds, and the loss
#: constant), so that bounds compound ``(1 + ROUNDING_MARGIN)`` per layer. The
#: bounds are exact in real arithmetic; the gradients are computed in float32,
#: whose rounding made true per-sample norms exceed bounds without a
#: spectral-norm factor (an input-clip -> dense kernel, a last-layer bias, a
#: loss constant) by up to 8e-8 relative. 1e-4 is ~1700 float32 units of
#: roundoff per layer: the worst-case error ``K u`` of a length-``K`` dot
#: product up to ``K ~ 1700``, and far more than the typical ``sqrt(K) u``. It
#: costs 0.01 % more noise per layer. Half precision is refused.
ROUNDING_MARGIN = 1e-4

#: Relative allowance added to every spectral norm computed in float64. The
#: eigen-solver's rounding error is ~1e-13 relative; this margin makes the
#: certified value an upper bound with a wide safety factor, and is far below
#: any noise calibration effect.
NUMERICAL_MARGIN = 1e-6


HALF_PRECISION = ("float16", "bfloat16")


def refuse_half_precision(layer):
    """Raises :class:`ModelNotSupportedError` if ``layer`` computes or stores variables below float32.

    The bounds hold up to float32 rounding (:data:`ROUNDING_MARGIN`); in half
    precision a clipped input norm reaches 1.0006 (float16) or 1.004
    (bfloat16) of its bound.
    """
    dtypes = {getattr(layer, "compute_dtype", None), getattr(layer, "variable_dtype", None)}
    if dtypes & set(HALF_PRECISION):
        raise ModelNotSupportedError(
            f"layer {layer.name!r} computes in {layer.compute_dtype} with {layer.variable_dtype} variables; DP "
            "bounds need float32 or float64: build it with dtype='float32' (and no mixed-precision policy)"
        )


def as_bound(value):
    """Converts a python number or tensor into a float64 scalar bound."""
    return tf.cast(value, tf.float64)


def certified_spectral_norm(matrix):
    """Upper bound of the largest singular value of a 2-D matrix.

    Computed in float64 from the eigenvalues of the smaller Gram matrix
    (``W^T W`` or ``W W^T``), then inflated by :data:`NUMERICAL_MARGIN`.
    Unlike power iteration, it never under-estimates.
    """
    m = tf.cast(matrix, tf.float64)
    rows, cols = m.shape
    gram = tf.matmul(m, m, transpose_a=True) if rows >= cols else tf.matmul(m, m, transpose_b=True)
    top = tf.reduce_max(tf.linalg.eigvalsh(gram))
    return tf.sqrt(tf.maximum(top, 0.0)) * (1.0 + NUMERICAL_MARGIN)


def l2_norm(tensor):
    """Norm of a whole tensor, float64."""
    return tf.norm(tf.reshape(tf.cast(tensor, tf.float64), [-1]))


def window_overlap(window, strides):
    """How many windows (patches) can contain one input pixel at most.

    Along one axis, input index ``i`` lies in window ``o`` iff
    ``o*s <= i + pad < o*s + k``, so at most ``ceil(k / s)`` windows; padding
    adds windows only over padded (zero) positions. The count over 2-D
    windows is the product over axes.
    """
    return math.prod(math.ceil(k / s) for k, s in zip(window, strides))


class DPLayer:
    """Mixin adding the bound protocol to a ``keras.layers.Layer``.

    The defaults describe a parameter-free 1-Lipschitz layer that does not
    increase norms (flatten, reshape); layers override what differs.
    """

    #: True for layers that take a list of inputs (merges).
    multi_input = False

    def output_bound(self, input_bound):
        """Bound on ``||output||`` given ``||input|| <= input_bound``."""
        return input_bound

    def lipschitz_constant(self):
        """Certified Lipschitz constant of the layer for the weights in use."""
        return as_bound(1.0)

    def input_cotangent_bound(self, cotangent_bound):
        """Bound on ``||d loss / d input||`` given ``||d loss / d output|| <= c``."""
        return self.lipschitz_constant() * cotangent_bound

    def gradient_bounds(self, input_bound, cotangent_bound):
        """List of ``(variable, bound)`` for every variable of the layer."""
        del input_bound, cotangent_bound
        return []


class StepRelease:
    """Mixin of a layer that releases a noisy statistic of each private batch (e.g. :class:`AdaptiveClipGradient`).

    The model's train step gathers the statistic while it computes the step's
    gradient (:meth:`gathering`), then, after the update, calls
    :meth:`release` with the policy's ``quantile_noise_multiplier``: the
    statistic has sensitivity 1 and the accountant composes its release with
    the gradient's. So one call of one such layer per model is supported.
    """

    def gathering(self):
        """A context inside which the layer gathers this step's statistic (from zero)."""
        raise NotImplementedError

    def release(self, noise_multiplier, expected_batch_size, generator):
        """Releases the statistic with Gaussian noise ``noise_multiplier`` and forgets the raw value."""
        raise NotImplementedError
