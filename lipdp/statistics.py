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
per channel (every axis but the batch and the last), in two Gaussian stages:

* each example is first projected onto the ``clip_norm`` ball (``R``), as
  :class:`lipdp.layers.ChannelStandardization` does before standardising;
* **means.** ``m_i``: its per-channel mean over the positions,
  ``||m_i|| <= R / sqrt(P)`` (Cauchy-Schwarz over the positions of each
  channel), then projected onto the ``mean_clip`` ball (``C_m``): sensitivity
  ``D_m = min(R / sqrt(P), C_m)``. Released: ``mu = (sum_i m_i + noise) / N``;
* **variances** (``scale=True``), around the released ``mu`` (a public value
  by then): ``u_i``, the per-channel mean of ``(x_i - mu)^2``;
  ``||u_i||_2 <= ||u_i||_1 = ||x_i - mu||^2 / P <= (R + sqrt(P) ||mu||)^2 / P``,
  then projected onto the ``variance_clip`` ball (``C_v``): sensitivity
  ``D_v = min((R + sqrt(P) ||mu||)^2 / P, C_v)``. Released:
  ``var = (sum_i u_i + noise) / N`` (floored), ``scale = sqrt(var)``;
* each stage's noise is Gaussian with std ``z D`` (``z sqrt(2) D`` for each
  of the two stages when both run). Divided by their sensitivities, the
  stages are two Gaussian mechanisms of sensitivity 1 and noise ``z sqrt 2``,
  the second chosen after the first's output: their adaptive composition is
  exactly one ``GaussianDpEvent(z)``, which is what the accountant counts.
  For the RDP accountant, Renyi divergences add up: ``1 / z^2 = 2 / (z sqrt
  2)^2``; for the PLD accountant, ``mu``-GDP mechanisms compose adaptively to
  ``sqrt(mu_1^2 + mu_2^2)``-GDP (Dong, Roth and Su, Gaussian differential
  privacy, 2022), here ``1 / z``: the trade-off curve of one Gaussian of
  noise ``z``. Under replace-one adjacency (shuffle sampling) each
  sensitivity at most doubles: the sampler's ``release_event(z)`` is
  ``GaussianDpEvent(z / 2)``;
* ``N``, the training set size, is a public parameter (the privacy
  statement prints it, and the steps' sampling rate ``B / N`` uses it): the
  release is the two noisy sums, and dividing by ``N`` is post-processing.
  Were ``N`` itself secret, the division would not be: adding an example
  can move ``sum / N`` by ``2 D / (N + 1)`` (every other example's vector
  opposite to the added one's), twice what it moves with ``N`` fixed, and
  the release is then worth about one Gaussian of noise ``z / 2``, as under
  replace-one adjacency.

The noise comes from OS entropy, never from a seed in a config.

Choosing the clips: a worst-case ``R`` (the largest possible input norm)
buries small channels in noise. On CIFAR-10 scattering features of ``[0, 1]``
images (example norms: median 7.1, max 13.7; 90 % of the 243 channels have
standard deviations near 0.0035), the variance release bounded by ``R``
alone released 210 of the 243 scales wrong by more than 2x at ``R = 55.5``
(an earlier release of raw second moments, sensitivity ``R^2 / P``: 208, and
130 at ``R = 14``); Handcrafted-DP's release (moment vectors clipped
separately to their median norms, a data-dependent threshold) 63;
``mean_clip`` 0.8 and ``variance_clip`` 0.1, 17
(``experiments/results/cifar10_statistics_release.txt``).
``mean_clip`` and ``variance_clip`` near the typical norms of ``m_i`` and
``u_i`` do what Handcrafted-DP's median does, with thresholds fixed in
advance: choose them on data that is not the private training set or on a
carve, outside the guarantee.
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


def example_moments(x, clip_norm, batch_size=2048):
    """``(means, mean_squares)``, each ``(N, C)`` float64: per channel, over the positions of each example.

    Each example is projected onto the ``clip_norm`` ball first (``None``: not projected). One pass over
    ``x``, read in blocks: a memory-mapped ``x`` is never loaded whole.
    """
    axes = tuple(range(1, x.ndim - 1))
    means, squares = [], []
    for block in streaming.row_blocks(x, batch_size):
        block = tf.constant(block, tf.float64)
        clipped = (block if clip_norm is None else clip_per_sample(block, clip_norm)).numpy()
        means.append(clipped.mean(axis=axes))
        squares.append(np.square(clipped).mean(axis=axes))
    return np.concatenate(means), np.concatenate(squares)


def squared_deviations(means, mean_squares, centre):
    """Each example's per-channel mean of ``(x - centre)^2``, from its moments: ``s - 2 centre m + centre^2``."""
    return np.maximum(mean_squares - 2.0 * centre * means + np.square(centre), 0.0)  # >= 0 up to rounding


def project_rows(rows, bound):
    """Each row projected onto the l2 ball of radius ``bound``."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def mean_sensitivity(feature_shape, clip_norm, mean_clip=None):
    """``D_m = min(R / sqrt(P), C_m)``: the l2 norm of one example's projected vector of channel means."""
    return min(clip_norm / math.sqrt(math.prod(feature_shape[:-1])), math.inf if mean_clip is None else mean_clip)


def deviation_sensitivity(feature_shape, clip_norm, centre, variance_clip=None):
    """``D_v = min((R + sqrt(P) ||mu||)^2 / P, C_v)``: the l2 norm of one example's projected deviation vector."""
    positions = math.prod(feature_shape[:-1])
    worst = (clip_norm + math.sqrt(positions) * float(np.linalg.norm(centre))) ** 2 / positions
    return min(worst, math.inf if variance_clip is None else variance_clip)


def _noisy_sum(rows, bound, noise_std, rng):
    return project_rows(rows, bound).sum(axis=0) + rng.normal(0.0, noise_std * bound, rows.shape[1])


def release_channel_statistics(
    x, *, clip_norm, noise_multiplier, scale=False, mean_clip=None, variance_clip=None, rng=None
):
    """A :class:`ChannelStandardization` from a DP release of ``x``'s channel statistics (see the module).

    Args:
        x: Training features, ``(N, ..., C)``.
        clip_norm: ``R``, the norm each example is projected to first (here and in the layer).
        noise_multiplier: ``z`` of the release. The layer carries it: ``make_private`` composes the release of
            every such layer in the model (a head trained on the standardised features without the layer needs
            ``make_private(..., releases=(z,))``).
        scale: Also release the channel variances and divide by the standard deviation.
        mean_clip: ``C_m``, the norm each example's vector of channel means is projected to (``None``: only
            ``R``'s bound).
        variance_clip: ``C_v``, the same for each example's vector of squared deviations (``scale`` only).
        rng: A ``numpy`` generator for the noise; ``None`` draws OS entropy.

    Returns:
        The layer, ready to apply to the training and any other features.
    """
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    for name, value in (("mean_clip", mean_clip), ("variance_clip", variance_clip)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 or None, got {value}")
    if variance_clip is not None and not scale:
        raise ValueError("variance_clip clips the variance release: it needs scale=True")
    if np.ndim(x) < 2 or len(x) == 0:
        raise ValueError(f"x: expected features of shape (N, ..., C) with N >= 1, got shape {np.shape(x)}")
    check_finite("x", x)  # one NaN would make every released mean NaN, which no neighbouring data set produces
    rng = np.random.default_rng() if rng is None else rng
    noise_std = noise_multiplier * (math.sqrt(2.0) if scale else 1.0)
    means, mean_squares = example_moments(x, clip_norm)
    d_mean = mean_sensitivity(x.shape[1:], clip_norm, mean_clip)
    mean = _noisy_sum(means, d_mean, noise_std, rng) / len(x)
    deviation = np.ones_like(mean)
    if scale:  # the second stage: deviations from the released mean, each example's from its own moments
        d_deviation = deviation_sensitivity(x.shape[1:], clip_norm, mean, variance_clip)
        deviations = squared_deviations(means, mean_squares, mean)
        variance = _noisy_sum(deviations, d_deviation, noise_std, rng) / len(x)
        floor = VARIANCE_FLOOR * max(float(np.mean(np.maximum(variance, 0.0))), 1e-30)
        deviation = np.sqrt(np.maximum(variance, floor))
    return ChannelStandardization(mean, deviation, clip_norm, noise_multiplier=noise_multiplier)
