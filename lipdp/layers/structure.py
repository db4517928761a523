"""Parameter-free layers: input norm clipping, reshaping, centering, merges and
backward-pass gradient clipping."""

import contextlib

import tensorflow as tf

from lipdp import distribute
from lipdp.backend import keras
from lipdp.layers.base import DPLayer, StepRelease, as_bound

#: Samples with more entries than this have their squares summed in float64 a slice of entries at a time.
NORM_SLICE_SIZE = 2**10


def _per_sample_norms(tensor, keepdims=False):
    """The l2 norm of each sample over every non-batch axis, in float64 (no overflow).

    Wide samples are cast to float64 a slice of at most :data:`NORM_SLICE_SIZE`
    entries at a time: a float64 copy of a whole batch of scattering features
    (8,192 x 15,552) would take 1 GB.
    """
    flat = tf.reshape(tensor, [tf.shape(tensor)[0], -1])
    width = flat.shape[1]
    starts = range(0, width, NORM_SLICE_SIZE) if width is not None else [0]
    stops = [None] * len(starts) if width is None else [start + NORM_SLICE_SIZE for start in starts]
    squares = [tf.reduce_sum(tf.square(tf.cast(flat[:, a:b], tf.float64)), axis=1) for a, b in zip(starts, stops)]
    norms = tf.sqrt(tf.add_n(squares))
    return tf.reshape(norms, [-1] + [1] * (len(tensor.shape) - 1)) if keepdims else norms


def _float64(value):
    """``value`` as a float64 tensor; a Python number is not rounded through float32 (as ``tf.cast`` would)."""
    return tf.cast(value, tf.float64) if tf.is_tensor(value) else tf.constant(value, tf.float64)


def clip_per_sample(tensor, max_norm):
    """Scales each sample to norm <= ``max_norm``; the norm is taken in float64 (no overflow)."""
    norm = _per_sample_norms(tensor, keepdims=True)
    scale = tf.minimum(tf.cast(1.0, tf.float64), _float64(max_norm) / tf.maximum(norm, 1e-12))
    return tensor * tf.cast(scale, tensor.dtype)


@keras.utils.register_keras_serializable("lipdp")
class InputNormClip(DPLayer, keras.layers.Layer):
    """Projects each sample onto the l2 ball of radius ``norm``: the only place
    where data norms are enforced.

    Bounds: output ``<= norm`` whatever the input, Lipschitz 1 (a projection
    onto a convex set), no variables. Non-finite inputs (NaN, inf) raise an
    ``InvalidArgumentError`` instead of propagating silently.
    """

    def __init__(self, norm, **kwargs):
        super().__init__(**kwargs)
        if not norm > 0:
            raise ValueError(f"InputNormClip norm must be > 0, got {norm}")
        self.norm = float(norm)

    def call(self, inputs):
        inputs = tf.debugging.assert_all_finite(inputs, "lipdp: the model input contains NaN or inf")
        return clip_per_sample(inputs, self.norm)

    def output_bound(self, input_bound):
        del input_bound
        return as_bound(self.norm)

    def get_config(self):
        return {**super().get_config(), "norm": self.norm}


@keras.utils.register_keras_serializable("lipdp")
class Flatten(DPLayer, keras.layers.Flatten):
    """Keras ``Flatten``. Bounds: output ``= ||x||``, Lipschitz 1, no variables."""


@keras.utils.register_keras_serializable("lipdp")
class Reshape(DPLayer, keras.layers.Reshape):
    """Keras ``Reshape``. Bounds: output ``= ||x||``, Lipschitz 1, no variables."""


@keras.utils.register_keras_serializable("lipdp")
class LayerCentering(DPLayer, keras.layers.Layer):
    """Subtracts, for each sample separately, its mean over ``axes``.

    ``axes=None`` uses every non-batch axis; ``axes=(1, 2)`` centres each
    channel of an image over its spatial positions. Centering is an orthogonal
    projection of each sample (never a mix across the batch), so the bounds are
    output ``<= ||x||``, Lipschitz 1, no variables.
    """

    def __init__(self, axes=None, **kwargs):
        super().__init__(**kwargs)
        axes = (axes,) if isinstance(axes, int) else axes
        if axes is not None and (not axes or 0 in axes):
            raise ValueError(
                f"LayerCentering axes={axes!r}: give non-batch axes; averaging over the batch "
                "axis 0 would mix samples and break per-sample bounds"
            )
        self.axes = None if axes is None else tuple(axes)

    def build(self, input_shape):
        rank = len(input_shape)
        if self.axes is not None and any(axis % rank == 0 for axis in self.axes):
            raise ValueError(
                f"{self.name}: axes {self.axes} include the batch axis for rank-{rank} inputs; "
                "that would mix samples and break per-sample bounds"
            )
        super().build(input_shape)

    def call(self, inputs):
        axes = self.axes or tuple(range(1, len(inputs.shape)))
        return inputs - tf.reduce_mean(inputs, axis=axes, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "axes": self.axes}


class _Merge(DPLayer):
    """Records the number of merged inputs at build time; refuses broadcasting.

    A broadcast input would be repeated over many positions, multiplying its
    norm and its cotangent; the bounds below assume identical shapes.
    """

    multi_input = True

    def build(self, input_shape):
        shapes = {tuple(shape[1:]) for shape in input_shape}
        if len(shapes) != 1:
            raise ValueError(
                f"{self.name}: merged inputs must have identical shapes (no broadcasting), "
                f"got {[tuple(s) for s in input_shape]}"
            )
        self.num_inputs = len(input_shape)
        super().build(input_shape)


@keras.utils.register_keras_serializable("lipdp")
class Add(_Merge, keras.layers.Add):
    """Sum of n branches (e.g. a residual block's branch and skip).

    Bounds: output ``<= sum_i b_i``; each input receives the output cotangent
    unchanged (``c``); no variables.
    """

    def output_bound(self, input_bounds):
        return tf.add_n(input_bounds)

    def input_cotangent_bound(self, cotangent_bound):
        return [cotangent_bound] * self.num_inputs


@keras.utils.register_keras_serializable("lipdp")
class Average(_Merge, keras.layers.Average):
    """Mean of n branches. Bounds: output ``<= mean_i b_i``; each input gets ``c / n``."""

    def output_bound(self, input_bounds):
        return tf.add_n(input_bounds) / len(input_bounds)

    def input_cotangent_bound(self, cotangent_bound):
        return [cotangent_bound / self.num_inputs] * self.num_inputs


def _clip_cotangent(inputs, max_norm, counter=None):
    """Identity forward; the backward pass clips each sample's cotangent to ``max_norm``.

    With a ``counter`` (a variable), it also adds the number of samples whose
    cotangent norm was at most ``max_norm`` (see :class:`AdaptiveClipGradient`).
    """

    @tf.custom_gradient
    def clip(x):
        def backward(upstream):
            if counter is not None:
                under = _per_sample_norms(upstream) <= _float64(max_norm)
                counter.assign_add(tf.reduce_sum(tf.cast(under, counter.dtype)))
            return clip_per_sample(upstream, max_norm)

        return tf.identity(x), backward

    return clip(inputs)


@keras.utils.register_keras_serializable("lipdp")
class ClipGradient(DPLayer, keras.layers.Layer):
    """Identity forward; in the backward pass clips each sample's cotangent to ``clip_value``.

    Rule: the clip applies to the gradient of the *per-sample* loss. lipdp's
    train step differentiates the sum of per-sample losses and divides by the
    expected batch size only after noise is added, so the cotangent reaching
    this layer for sample i is exactly ``d loss_i / d output_i``. Bounds:
    output ``= ||x||``; input cotangent ``min(c, clip_value)``; no variables.
    The Lipschitz constant reported is 1 (forward pass). Inside a plain Keras
    model, whose loss is a batch mean, the threshold would act on cotangents
    already divided by the batch size.
    """

    def __init__(self, clip_value, **kwargs):
        super().__init__(**kwargs)
        if not clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {clip_value}")
        self.clip_value = float(clip_value)

    def call(self, inputs):
        return _clip_cotangent(inputs, self.clip_value)

    def input_cotangent_bound(self, cotangent_bound):
        return tf.minimum(cotangent_bound, as_bound(self.clip_value))

    def get_config(self):
        return {**super().get_config(), "clip_value": self.clip_value}


@keras.utils.register_keras_serializable("lipdp")
class AdaptiveClipGradient(StepRelease, ClipGradient):
    """:class:`ClipGradient` whose threshold follows a quantile of the per-sample cotangent norms.

    Andrew et al. (2021), "Differentially private learning with adaptive
    clipping": after each private step the threshold ``C`` moves by
    ``C <- C exp(-learning_rate (b - target_quantile))``, where ``b`` is the
    fraction of the step's examples whose cotangent norm was at most ``C``,
    released with Gaussian noise: ``b = (count + N(0, z_b^2)) / (q N)``
    (the count has sensitivity 1; ``z_b`` comes from the privacy policy's
    ``quantile_noise_share``, and the accountant composes this release with
    the gradient's, see :attr:`lipdp.policy.PrivacyPolicy.gradient_noise_multiplier`).
    The raw count is kept out of tracking (never saved); the threshold is a
    function of noisy releases only.

    Bounds: output ``= ||x||``; input cotangent ``min(c, C_t)`` with ``C_t``
    the threshold in use at this step (the release happens after the step's
    gradient); no trainable variables.

    Args:
        initial_value: the first threshold.
        target_quantile: the fraction of examples meant to be under the threshold.
        learning_rate: step size of the geometric update.
    """

    def __init__(self, initial_value, target_quantile=0.5, learning_rate=0.2, **kwargs):
        kwargs.pop("clip_value", None)
        super().__init__(clip_value=initial_value, **kwargs)
        if not 0.0 < target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.initial_value = float(initial_value)
        self.target_quantile, self.learning_rate = float(target_quantile), float(learning_rate)
        self.counting = False  # set by the model's train step while it computes the private gradient
        # Each replica counts its own examples (sync on read); the release all-reduces the counts.
        count = tf.Variable(
            0.0,
            trainable=False,
            dtype=tf.float64,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
        object.__setattr__(self, "_count", count)

    def build(self, input_shape):
        self.threshold = self.add_weight(
            name="threshold",
            shape=(),
            dtype=tf.float32,
            initializer=keras.initializers.Constant(self.initial_value),
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,  # every replica computes the same update
        )
        super().build(input_shape)

    def call(self, inputs):
        return _clip_cotangent(inputs, self.threshold, self._count if self.counting else None)

    def input_cotangent_bound(self, cotangent_bound):
        return tf.minimum(cotangent_bound, tf.cast(self.threshold, tf.float64))

    @contextlib.contextmanager
    def gathering(self):
        """Counts, from zero, the examples whose cotangent norm is under the threshold (other calls do not count)."""
        self._count.assign(0.0)
        self.counting = True
        try:
            yield
        finally:
            self.counting = False

    def release(self, noise_multiplier, expected_batch_size, generator):
        """The noisy fraction under the threshold, then the threshold update (after the step's gradient).

        Under a ``tf.distribute`` strategy, the replicas' counts are summed
        with the noise of the first replica only (one draw, as for the gradient).
        """
        noise = generator.normal([], dtype=tf.float64) * noise_multiplier * distribute.noise_mask()
        noisy_count = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.convert_to_tensor(self._count) + noise
        )
        fraction = noisy_count / expected_batch_size
        factor = tf.exp(-self.learning_rate * (fraction - self.target_quantile))
        with tf.control_dependencies(
            [self.threshold.assign(tf.cast(tf.cast(self.threshold, tf.float64) * factor, tf.float32))]
        ):
            return self._count.assign(0.0)  # the raw count does not outlive its noisy release

    def get_config(self):
        config = super().get_config()
        config.pop("clip_value", None)
        return {
            **config,
            "initial_value": self.initial_value,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
        }
