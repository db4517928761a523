"""Per-channel feature statistics of the training data, released once under DP before training.

A linear head on fixed features (scattering coefficients are moduli, all
positive) learns from what tells examples apart, yet most of each example's
norm is what all examples share: on CIFAR-10 scattering features the data
mean carries about 80 % of the squared norm, so after the input clip the
informative part is small next to the noise. Centring (and optionally
scaling) each channel by statistics of the training data fixes that; the
statistics are released with Gaussian noise, and the accountant composes the
release with the training steps (``releases`` in :mod:`lipdp.accounting`).

The release, for features ``x_i`` of shape ``(..., C)`` with ``P`` positions
per channel (every axis but the batch and the last):

* each example is first projected onto the ``clip_norm`` ball (``R``), as
  :class:`lipdp.layers.ChannelStandardization` does before standardising;
* ``m_i``: its per-channel mean over the positions; ``||m_i|| <= R / sqrt(P)``
  (Cauchy-Schwarz over the positions of each channel);
* ``v_i``: its per-channel mean of squares (``scale=True`` only);
  ``||v_i||_2 <= ||v_i||_1 = ||x_i||^2 / P <= R^2 / P``;
* released: ``S_m = sum_i m_i`` (and ``S_v = sum_i v_i``) plus Gaussian
  noise. Divided by their sensitivities ``D_m = R / sqrt(P)`` and
  ``D_v = R^2 / P`` (and by ``sqrt 2`` when both are released), the sums
  form one vector of add-or-remove-one sensitivity 1, released with noise
  multiplier ``z``: one ``GaussianDpEvent(z)``;
* ``mean = S_m / N``, ``var = S_v / N - mean^2`` (floored), ``scale =
  sqrt(var)``, with ``N`` the training set size, taken as public as the
  steps' expected batch size ``qN`` is.

The noise comes from OS entropy, never from a seed in a config.

Choosing ``R``: the variance's noise grows as ``R^2``. A worst-case ``R`` (the
largest possible input norm) buries small channels in noise: on CIFAR-10
scattering features of ``[0, 1]`` images (example norms: median 7.1, max
13.7; 90 % of the 243 channels have standard deviations near 0.0035), ``R =
55.5`` with ``z = 8`` released 208 of the 243 scales wrong by more than 2x
(up to 52x), ``R = 14`` still 130; Handcrafted-DP's release (moment vectors
clipped separately to their median norms) 58 (measured by
``experiments/cifar_statistics_release.py``). Choose ``R`` near the typical
example norm, on data that is not the private training set or on a carve.
"""

import math

import numpy as np
import tensorflow as tf

from lipdp import streaming
from lipdp.layers.frontends import ChannelStandardization
from lipdp.layers.structure import clip_per_sample
from lipdp.sampling import check_finite

#: Channel variances are floored at this fraction of their mean (a noisy variance can be <= 0).
VARIANCE_FLOOR = 1e-2


def channel_sums(x, clip_norm, batch_size=2048):
    """``(sum_i m_i, sum_i v_i)``: per-channel means and mean squares of the clipped examples, summed (float64)."""
    axes = tuple(range(1, x.ndim - 1))
    sum_means = np.zeros(x.shape[-1])
    sum_squares = np.zeros(x.shape[-1])
    for block in streaming.row_blocks(x, batch_size):  # a memory-mapped x is never loaded whole
        clipped = clip_per_sample(tf.constant(block, tf.float64), clip_norm).numpy()
        sum_means += clipped.mean(axis=axes).sum(axis=0)
        sum_squares += np.square(clipped).mean(axis=axes).sum(axis=0)
    return sum_means, sum_squares


def sensitivities(feature_shape, clip_norm):
    """``(D_m, D_v)``: add-or-remove-one l2 sensitivities of the two sums for features of ``feature_shape``."""
    positions = math.prod(feature_shape[:-1])
    return clip_norm / math.sqrt(positions), clip_norm**2 / positions


def release_channel_statistics(x, *, clip_norm, noise_multiplier, scale=False, rng=None):
    """A :class:`ChannelStandardization` from a DP release of ``x``'s channel statistics (see the module).

    Args:
        x: Training features, ``(N, ..., C)``.
        clip_norm: ``R``, the norm each example is projected to first (here and in the layer).
        noise_multiplier: ``z`` of the release. The layer carries it: ``make_private`` composes the release of
            every such layer in the model (a head trained on the standardised features without the layer needs
            ``make_private(..., releases=(z,))``).
        scale: Also release the second moments and divide by the standard deviation.
        rng: A ``numpy`` generator for the noise; ``None`` draws OS entropy.

    Returns:
        The layer, ready to apply to the training and any other features.
    """
    if not (clip_norm > 0 and noise_multiplier > 0):
        raise ValueError(f"clip_norm and noise_multiplier must be > 0, got {clip_norm}, {noise_multiplier}")
    check_finite("x", x)  # one NaN would make every released mean NaN, which no neighbouring data set produces
    rng = np.random.default_rng() if rng is None else rng
    sum_means, sum_squares = channel_sums(x, clip_norm)
    d_mean, d_square = sensitivities(x.shape[1:], clip_norm)
    spread = noise_multiplier * (math.sqrt(2.0) if scale else 1.0)
    mean = (sum_means + rng.normal(0.0, spread * d_mean, sum_means.shape)) / len(x)
    deviation = np.ones_like(mean)
    if scale:
        variance = (sum_squares + rng.normal(0.0, spread * d_square, sum_squares.shape)) / len(x) - mean**2
        floor = VARIANCE_FLOOR * max(float(np.mean(np.maximum(variance, 0.0))), 1e-30)
        deviation = np.sqrt(np.maximum(variance, floor))
    return ChannelStandardization(mean, deviation, clip_norm, noise_multiplier=noise_multiplier)
