"""Feature front-ends, placed before :class:`lipdp.layers.InputNormClip`.

A front-end is a fixed map applied to each example on its own: no trainable
variables, no randomness. :class:`Scattering2D` estimates nothing from data;
:class:`ChannelStandardization` holds statistics released under DP before
training (:mod:`lipdp.statistics`), a release the accountant composes with
the steps, and is a fixed map once released. Privacy needs nothing
more than the input clip after it: the bounds of a DP network start at the
clip's output norm, whatever the front-end did to the example, so a front-end
states no bounds of its own (its output bound is unknown, ``None``, and the
clip replaces it). Because the map is fixed, its features may be computed once
per data set and cached (:func:`cached_features`); a trained model keeps the
front-end inside it, so it takes raw inputs.
"""

import hashlib
import json
import math
import os

import numpy as np
import tensorflow as tf

from lipdp import streaming
from lipdp.backend import keras
from lipdp.layers.base import NUMERICAL_MARGIN, DPLayer, as_bound
from lipdp.layers.structure import clip_per_sample


class FrontEnd(DPLayer):
    """Marks a layer as a per-example preprocessing map allowed before the input clip.

    Bounds: output unknown (``None``: only :class:`InputNormClip` may follow
    it), no variables; the cotangent flowing back into the model input feeds
    no variable, so it is reported as unbounded. ``lipschitz_constant`` is
    ``inf`` unless the front-end states one (:class:`Scattering2D` without
    normalisation, :class:`ChannelStandardization`); only the robustness
    certificates of :mod:`lipdp.robustness` use it, never the privacy bounds.
    """

    def output_bound(self, input_bound):
        del input_bound
        return None

    def lipschitz_constant(self):
        return as_bound(math.inf)

    def input_cotangent_bound(self, cotangent_bound):
        del cotangent_bound
        return as_bound(math.inf)


@keras.utils.register_keras_serializable("lipdp")
class Scattering2D(FrontEnd, keras.layers.Layer):
    """Wavelet scattering transform (kymatio 0.3.0) of each image, channels last.

    Input ``(batch, H, W, C)``, output ``(batch, H / 2^J, W / 2^J, C K)`` with
    ``K = 1 + L J + L^2 J (J - 1) / 2`` scattering channels per input channel
    (``max_order=2``). With ``normalize="group"`` each example's channels are
    split into ``groups`` groups, each centred and scaled to unit variance
    over its positions and channels (a per-example map: it never mixes
    examples, and has no affine parameters). With ``flip_invariant=True`` the
    features are ``(S(x) + S(x'))/2``, ``x'`` the left-right mirror image of
    ``x``: a map of the example alone, invariant to mirroring it, whose
    Lipschitz constant is at most that of ``S`` (mirroring is an isometry).
    A linear head on them scores an image by the mean of its scores on the
    image and on its mirror image while the clips after the front-end leave
    the features unchanged (a clip scales the mean, not each view: no longer
    that mean once it clips). No trainable variables.

    Args:
        J: number of scales (the output is ``2^J`` times smaller per axis).
        L: number of orientations.
        max_order: 1 or 2.
        normalize: ``None`` or ``"group"``.
        groups: number of groups for ``normalize="group"``.
        flip_invariant: average the transform of the image and of its mirror image.
    """

    def __init__(self, J=2, L=8, max_order=2, normalize=None, groups=1, flip_invariant=False, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if normalize not in (None, "group"):
            raise ValueError(f"normalize must be None or 'group', got {normalize!r}")
        if int(groups) < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if not isinstance(flip_invariant, bool):
            raise ValueError(f"flip_invariant must be true or false, got {flip_invariant!r}")
        self.J, self.L, self.max_order = int(J), int(L), int(max_order)
        self.normalize, self.groups, self.flip_invariant = normalize, int(groups), flip_invariant

    def build(self, input_shape):
        from kymatio.tensorflow import Scattering2D as KymatioScattering2D

        if len(input_shape) != 4 or None in tuple(input_shape[1:]):
            raise ValueError(f"{self.name}: needs static (batch, H, W, C) inputs, got {tuple(input_shape)}")
        self._input_hwc = tuple(int(d) for d in input_shape[1:])
        height, width, self.channels = self._input_hwc
        self._scattering = KymatioScattering2D(J=self.J, shape=(height, width), L=self.L, max_order=self.max_order)
        out_channels = self.channels * self.scattering_channels()
        if self.normalize == "group" and out_channels % self.groups:
            raise ValueError(f"{self.name}: {out_channels} output channels are not divisible by groups={self.groups}")
        super().build(input_shape)

    def lipschitz_constant(self):
        """:func:`scattering_lipschitz_bound` of the built transform; ``inf`` with group normalisation.

        The flip-invariant mean ``(S(x) + S(x'))/2`` has the same bound: ``x -> x'`` is an isometry, so each term
        moves by at most half the bound times ``||x - y||``.

        Group normalisation divides each example by its own standard
        deviation, which is not globally Lipschitz. Privacy never uses this
        constant (a front-end's cotangent bound stays unbounded); robustness
        certificates (:mod:`lipdp.robustness`) do.
        """
        if self.normalize == "group" or not self.built:
            return as_bound(math.inf)
        if getattr(self, "_lipschitz", None) is None:  # fixed filters: computed once
            self._lipschitz = scattering_lipschitz_bound(self._scattering, self.max_order)
        return as_bound(self._lipschitz)

    def scattering_channels(self):
        """``K``, the scattering channels per input channel."""
        second = self.L**2 * self.J * (self.J - 1) // 2 if self.max_order == 2 else 0
        return 1 + self.L * self.J + second

    def call(self, inputs):
        x = tf.transpose(tf.cast(inputs, tf.float32), [0, 3, 1, 2])  # (B, C, H, W)
        s = self._scattering(x)  # (B, C, K, H', W')
        if self.flip_invariant:
            s = 0.5 * (s + self._scattering(tf.reverse(x, axis=[3])))
        s = tf.transpose(s, [0, 3, 4, 1, 2])  # (B, H', W', C, K)
        _, height, width, channels = self.compute_output_shape((None,) + self._input_hwc)
        s = tf.reshape(s, [-1, height, width, channels])
        if self.normalize == "group":
            grouped = tf.reshape(s, [-1, height, width, self.groups, channels // self.groups])
            mean, variance = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
            s = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + 1e-5), [-1, height, width, channels])
        return s

    def compute_output_shape(self, input_shape):
        scale = 2**self.J
        return tf.TensorShape(
            [
                input_shape[0],
                input_shape[1] // scale,
                input_shape[2] // scale,
                input_shape[3] * self.scattering_channels(),
            ]
        )

    def get_config(self):
        return {
            **super().get_config(),
            "J": self.J,
            "L": self.L,
            "max_order": self.max_order,
            "normalize": self.normalize,
            "groups": self.groups,
            "flip_invariant": self.flip_invariant,
        }


@keras.utils.register_keras_serializable("lipdp")
class ChannelStandardization(FrontEnd, keras.layers.Layer):
    """``(clip(x) - mean) / scale`` per channel (last axis), with ``clip`` the projection onto the ``clip_norm`` ball.

    ``mean`` and ``scale`` are per-channel statistics of the training data
    released under DP (:func:`lipdp.statistics.release_channel_statistics`;
    the accountant composes that release with the steps); once released, the
    map is fixed and per example. A linear head learns faster on centred
    features: the part of each example that all examples share no longer
    takes most of its norm, hence of the input clip after this layer.
    Bounds: none of its own (a front-end, see :class:`FrontEnd`); the
    :class:`InputNormClip` after it bounds the head's input.

    The layer carries its release: ``noise_multiplier`` is the noise
    multiplier of the Gaussian release the statistics came from, and
    ``make_private`` composes it with the steps by itself
    (``release_noise_multipliers``). It has no default: statistics computed
    without a release must be declared public with ``noise_multiplier=None``
    (computed from data that is not the private training set).
    """

    def __init__(self, mean, scale, clip_norm, noise_multiplier, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.scale = [float(v) for v in scale]
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        if len(self.mean) != len(self.scale) or not all(v > 0 for v in self.scale) or not self.clip_norm > 0:
            raise ValueError("ChannelStandardization needs as many means as scales, scales > 0 and clip_norm > 0")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 (or None: public statistics), got {noise_multiplier!r}")

    @property
    def release_noise_multipliers(self):
        """The release the statistics came from, for the accountant: ``(z,)``, or ``()`` for public statistics."""
        return () if self.noise_multiplier is None else (self.noise_multiplier,)

    def lipschitz_constant(self):
        """``max(1 / scale)``: the clip (a projection) is 1-Lipschitz, the shift an isometry, the scaling diagonal."""
        return as_bound(max(1.0 / s for s in self.scale))

    def build(self, input_shape):
        if input_shape[-1] != len(self.mean):
            raise ValueError(f"{self.name}: {len(self.mean)} channel statistics for {input_shape[-1]} channels")
        super().build(input_shape)

    def call(self, inputs):
        inputs = clip_per_sample(tf.cast(inputs, tf.float32), self.clip_norm)
        return (inputs - tf.constant(self.mean, tf.float32)) / tf.constant(self.scale, tf.float32)

    def get_config(self):
        config = {**super().get_config(), "mean": self.mean, "scale": self.scale, "clip_norm": self.clip_norm}
        return {**config, "noise_multiplier": self.noise_multiplier}


def _padding_copies(pad_before, pad_after, size):
    """The most times one pixel appears along an axis padded by reflection (kymatio's padding)."""
    indices = np.pad(np.arange(size), (pad_before, pad_after), mode="reflect")
    return int(np.bincount(indices).max())


def _frame_bound(filters, level):
    """``max over frequencies of sum_k |filter_k|^2`` at ``level``: the squared norm of the filter bank operator."""
    return float(np.max(sum(np.abs(np.asarray(f["levels"][level], np.float64)) ** 2 for f in filters)))


def scattering_lipschitz_bound(scattering, max_order=2):
    """A certified l2 Lipschitz bound of a built kymatio ``Scattering2D`` (any number of input channels).

    kymatio pads each channel by reflection (a pixel appears at most ``c``
    times: norm ``<= sqrt(c)``), filters it by circular convolution in the
    Fourier domain (the filter bank ``x -> (x * phi, x * psi_k)`` has squared
    norm ``A = max_w |phi(w)|^2 + sum_k |psi_k(w)|^2``), subsamples and crops
    (restrictions to a subset of coordinates: norm ``<= 1``) and takes complex
    moduli (1-Lipschitz). With ``A_0`` at full resolution, ``A_1(j)`` for the
    low-pass and the second-order wavelets applied after a first-order one of
    scale ``j``, and ``A_2 = max_j |phi_j|^2``, every path's energy telescopes:
    ``||S x - S y||^2 <= c A_0 max(1, C_1) ||x - y||^2`` with
    ``C_1 = max_j A_1(j) max(1, A_2)`` (order 1: ``C_1 = A_2``). kymatio's
    Morlet filters are not a tight frame (``A_0`` is about 1.8 for ``J = 2``),
    so the bound is above 1 (about 3.0 for 32x32 images, ``J = 2``, ``L = 8``):
    the transform is non-expansive only in the continuous theory. Inflated by
    :data:`lipdp.layers.base.NUMERICAL_MARGIN`; kymatio's float32 FFTs are
    covered by the rounding allowance of :mod:`lipdp.robustness`.
    """
    top, bottom, left, right = scattering.pad.pad_size
    height, width = scattering.shape
    copies = _padding_copies(top, bottom, height) * _padding_copies(left, right, width)
    phi, psi = scattering.phi, scattering.psi
    scales = range(scattering.J)
    lowpass = max(_frame_bound([phi], j) for j in scales)
    if max_order == 2:
        second = max(_frame_bound([phi] + [p for p in psi if p["j"] > j], j) for j in scales)
        after_first = second * max(1.0, lowpass)
    else:
        after_first = lowpass
    squared = copies * _frame_bound([phi] + list(psi), 0) * max(1.0, after_first)
    return math.sqrt(squared) * (1.0 + NUMERICAL_MARGIN)


def array_fingerprint(x, digest=None):
    """A short hash of ``x``'s shape, dtype and values, fed to ``digest`` (a fresh SHA-256 by default).

    The values are hashed a block of rows at a time (the same hash as of all
    the bytes at once), so a memory-mapped ``x`` is never copied whole.
    """
    digest = hashlib.sha256() if digest is None else digest
    digest.update(str((x.shape, x.dtype.str)).encode())
    for block in streaming.row_blocks(np.atleast_1d(x)):
        digest.update(np.ascontiguousarray(block).data)
    return digest.hexdigest()[:32]


def _fingerprint(layer, x):
    settings = {k: v for k, v in layer.get_config().items() if k != "name"}
    return array_fingerprint(x, hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()))


def cached_features(layer, x, cache_dir=None, batch_size=512, verbose=0):
    """``layer(x)`` computed in batches, cached on disk by a hash of the data and the layer's settings.

    ``cache_dir=None`` computes without caching and returns an array in
    memory. With a cache, the features are written to the cache file batch
    by batch and returned memory-mapped from it (``np.load(mmap_mode="r")``,
    read-only): nothing is loaded until used (:mod:`lipdp.streaming`). The key
    covers every value of ``x`` and the layer's config, so a change to either
    recomputes.
    """
    if len(x) == 0:
        raise ValueError(f"cached_features: no examples to compute {type(layer).__name__} features of")
    if cache_dir is None:
        return np.concatenate(list(_feature_batches(layer, x, batch_size, verbose)))
    path = os.path.join(cache_dir, f"{type(layer).__name__}-{_fingerprint(layer, x)}.npy")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp.npy"
        _write_npy(temporary, len(x), _feature_batches(layer, x, batch_size, verbose))
        os.replace(temporary, path)  # atomic: a killed run never leaves a truncated cache file
    return np.load(path, mmap_mode="r")


def _feature_batches(layer, x, batch_size, verbose):
    """``layer`` applied to ``x`` a batch at a time (numpy arrays), with a progress bar."""
    progress = keras.utils.Progbar(len(x), verbose=verbose, unit_name="example")
    for start in range(0, len(x), batch_size):
        features = layer(x[start : start + batch_size]).numpy()
        progress.add(len(features))
        yield features


def _write_npy(path, rows, batches):
    """Writes an ``.npy`` of ``rows`` rows from consecutive ``batches`` without holding more than one of them."""
    with open(path, "wb") as handle:
        for index, batch in enumerate(batches):
            if index == 0:
                header = {"descr": np.lib.format.dtype_to_descr(batch.dtype), "fortran_order": False}
                np.lib.format.write_array_header_1_0(handle, {**header, "shape": (rows,) + batch.shape[1:]})
            handle.write(np.ascontiguousarray(batch).data)
