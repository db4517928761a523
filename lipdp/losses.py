"""Per-sample losses that declare their Lipschitz constant w.r.t. the logits.

The constant bounds ``||d loss_i / d logits_i||`` for every label and logit
vector: it is the cotangent bound that starts the backward bound propagation.
Every loss here is a function of one sample only; losses normalised by batch
statistics (deel-lip's KR / HKR losses divide by the batch's class counts)
have no per-sample bound and are refused by :mod:`lipdp.sensitivity`.
Labels are one-hot (or soft) vectors of the logits' width.
"""

import math

import tensorflow as tf

from lipdp.backend import keras


def finite_labels(y_true, y_pred):
    """Labels cast to the logits' dtype, non-finite entries replaced by 0.

    Sanitising instead of asserting keeps the bounds for *any* label a record
    holds, without a data-dependent crash. The label and logit shapes must
    match (checked when the step is traced, not on data).
    """
    label_shape, logit_shape = tf.TensorShape(y_true.shape), tf.TensorShape(y_pred.shape)
    if (
        label_shape.rank is not None
        and logit_shape.rank is not None
        and (label_shape.rank != logit_shape.rank or label_shape[-1] != logit_shape[-1])
    ):
        raise ValueError(
            f"labels of shape {label_shape} do not match logits of shape {logit_shape}: "
            "lipdp losses take one-hot (or soft) labels of the logits' width"
        )
    y_true = tf.cast(y_true, tf.as_dtype(y_pred.dtype))
    return tf.where(tf.math.is_finite(y_true), y_true, tf.zeros_like(y_true))


def unit_interval_labels(y_true, y_pred):
    """:func:`finite_labels` projected onto ``[0, 1]``, which the constants below assume."""
    return tf.clip_by_value(finite_labels(y_true, y_pred), 0.0, 1.0)


class LipschitzLoss(keras.losses.Loss):
    """Base class: ``call`` returns per-sample losses; ``logit_lipschitz`` the bound.

    Every ``call`` first sanitises the labels (:func:`finite_labels`,
    :func:`unit_interval_labels`), so the constant holds for any label value.
    """

    def logit_lipschitz(self, num_logits):
        """Bound on the per-sample loss gradient norm w.r.t. ``num_logits`` logits."""
        raise NotImplementedError


@keras.utils.register_keras_serializable("lipdp")
class TauCategoricalCrossentropy(LipschitzLoss):
    """Softmax cross-entropy at temperature ``tau``: ``CE(y, softmax(tau z)) / tau``.

    Gradient w.r.t. ``z``: ``p - y`` with ``p = softmax(tau z)``. Both ``p``
    and ``y`` lie in the probability simplex, whose diameter is ``sqrt(2)``,
    so the Lipschitz constant is ``sqrt(2)`` whatever ``tau``.
    """

    def __init__(self, tau=1.0, name="tau_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)

    def call(self, y_true, y_pred):
        y_true = unit_interval_labels(y_true, y_pred)
        # renormalise onto the simplex (an all-zero row becomes uniform)
        count = tf.cast(tf.shape(y_true)[-1], y_pred.dtype)
        total = tf.reduce_sum(y_true, axis=-1, keepdims=True)
        y_true = tf.where(total > 0, y_true / tf.maximum(total, 1e-12), tf.ones_like(y_true) / count)
        return tf.nn.softmax_cross_entropy_with_logits(y_true, self.tau * y_pred) / self.tau

    def logit_lipschitz(self, num_logits):
        return math.sqrt(2.0)

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}


@keras.utils.register_keras_serializable("lipdp")
class MulticlassHinge(LipschitzLoss):
    """One-vs-all hinge: ``mean_j relu(margin / 2 - s_j z_j)``, ``s = 2 y - 1``.

    Each partial derivative is ``0`` or ``-s_j / C`` over ``C`` logits, so the
    gradient norm is at most ``sqrt(C) / C = 1 / sqrt(C)``.
    """

    def __init__(self, min_margin=1.0, name="multiclass_hinge", **kwargs):
        super().__init__(name=name, **kwargs)
        self.min_margin = float(min_margin)

    def call(self, y_true, y_pred):
        signs = 2.0 * unit_interval_labels(y_true, y_pred) - 1.0
        return tf.reduce_mean(tf.nn.relu(self.min_margin / 2.0 - signs * y_pred), axis=-1)

    def logit_lipschitz(self, num_logits):
        return 1.0 / math.sqrt(num_logits)

    def get_config(self):
        return {**super().get_config(), "min_margin": self.min_margin}


@keras.utils.register_keras_serializable("lipdp")
class HingeKR(LipschitzLoss):
    """Hinge + Kantorovich-Rubinstein, reformulated per sample.

    ``mean_j [ -s_j z_j + alpha relu(margin / 2 - s_j z_j) ]``, ``s = 2 y - 1``.
    deel-lip's HKR divides the KR term by the batch's class counts, which makes
    one sample's gradient depend on the others; here each sample weighs its own
    term, so the gradient of sample i only depends on sample i. Each partial
    derivative has magnitude at most ``(1 + alpha) / C``, hence the constant
    ``(1 + alpha) / sqrt(C)``.
    """

    def __init__(self, alpha=10.0, min_margin=1.0, name="hinge_kr", **kwargs):
        super().__init__(name=name, **kwargs)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.min_margin = float(min_margin)

    def call(self, y_true, y_pred):
        signs = 2.0 * unit_interval_labels(y_true, y_pred) - 1.0
        margins = signs * y_pred
        return tf.reduce_mean(-margins + self.alpha * tf.nn.relu(self.min_margin / 2.0 - margins), axis=-1)

    def logit_lipschitz(self, num_logits):
        return (1.0 + self.alpha) / math.sqrt(num_logits)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "min_margin": self.min_margin}


@keras.utils.register_keras_serializable("lipdp")
class KCosineSimilarity(LipschitzLoss):
    """``-<y / ||y||, z / max(||z||, 1/K)>``: cosine similarity made K-Lipschitz.

    Where ``||z|| < 1/K`` the loss is linear in ``z`` with gradient ``-K y_hat``
    (norm ``K``); elsewhere the gradient is ``-(I - u u^T) y_hat / ||z||`` with
    ``u = z / ||z||``, of norm ``<= 1 / ||z|| <= K``. Hence the constant ``K``.
    """

    def __init__(self, K=1.0, name="k_cosine_similarity", **kwargs):
        super().__init__(name=name, **kwargs)
        if not K > 0:
            raise ValueError(f"K must be > 0, got {K}")
        self.K = float(K)

    def call(self, y_true, y_pred):
        y_true = finite_labels(y_true, y_pred)
        y_unit = y_true / tf.maximum(tf.norm(y_true, axis=-1, keepdims=True), 1e-12)
        scale = tf.maximum(tf.norm(y_pred, axis=-1, keepdims=True), 1.0 / self.K)
        return -tf.reduce_sum(y_unit * y_pred / scale, axis=-1)

    def logit_lipschitz(self, num_logits):
        return self.K

    def get_config(self):
        return {**super().get_config(), "K": self.K}
