"""Dense and convolution layers with norm-constrained weights.

The weight constraint is a Keras constraint, applied after every optimiser
update (and once at build), so the variable *is* the weight used in the
forward pass and its gradient is the plain ``x z^T`` form. The bounds never
trust the constraint: they use the certified spectral norm of the weights as
they are (Bjorck orthonormalisation is approximate, ``||W||_2`` may be 1.001).
"""

import math

import tensorflow as tf
from deel.lip.normalizers import bjorck_normalization, spectral_normalization

from lipdp.backend import keras
from lipdp.layers.base import (
    DPLayer,
    as_bound,
    certified_spectral_norm,
    l2_norm,
    refuse_half_precision,
    window_overlap,
)
from lipdp.tf_workarounds import subsampled_pointwise, with_stand_in_for_empty_batch, without_stand_in

WEIGHT_CONSTRAINTS = ("orthogonal", "spectral", "frobenius")


@keras.utils.register_keras_serializable("lipdp")
class NormBallConstraint(keras.constraints.Constraint):
    """Projects a tensor onto the l2 (Frobenius) ball of radius ``max_norm``."""

    def __init__(self, max_norm):
        self.max_norm = float(max_norm)

    def __call__(self, w):
        norm = tf.norm(tf.reshape(w, [-1]))
        return w * tf.minimum(1.0, self.max_norm / tf.maximum(norm, 1e-12))

    def get_config(self):
        return {"max_norm": self.max_norm}


@keras.utils.register_keras_serializable("lipdp")
class SpectralNormConstraint(keras.constraints.Constraint):
    """Rescales a kernel, reshaped to ``(-1, out)``, to spectral norm <= ``max_norm``."""

    def __init__(self, max_norm):
        self.max_norm = float(max_norm)

    def __call__(self, w):
        sigma = certified_spectral_norm(tf.reshape(w, [-1, w.shape[-1]]))
        scale = tf.minimum(as_bound(1.0), self.max_norm / tf.maximum(sigma, 1e-12))
        return w * tf.cast(scale, w.dtype)

    def get_config(self):
        return {"max_norm": self.max_norm}


@keras.utils.register_keras_serializable("lipdp")
class OrthogonalConstraint(keras.constraints.Constraint):
    """Bjorck orthonormalisation of a kernel reshaped to ``(-1, out)``, scaled to ``k_coef_lip``.

    deel-lip's reshaped kernel orthogonalisation (``SpectralConstraint``):
    a power iteration estimates the top singular value, the kernel is divided
    by it, then Bjorck iterations ``w <- (1 + beta) w - beta w w^T w`` run
    until an update moves less than ``eps_bjorck`` (at most
    ``maxiter_bjorck``). The difference: the power iteration starts from the
    fixed vector ``ones / sqrt(out)`` instead of a fresh random one at each
    call, so the projection is a deterministic function of the kernel (the
    same on every replica of a distributed step, and no random op in the
    step). Kernels stay near orthogonal between steps, where every start
    vector gives the top singular value to within the singular value spread.

    Measured (``experiments/profile_step.py``): the projection is about 1 %
    of a step of the ``configs/mnist_conv.yaml`` CNN, and a warm-started
    power iteration (``u`` kept between calls) was no faster: Bjorck
    dominates. The privacy bounds never use this constraint: they are
    certified from the weights as they are (``certified_spectral_norm``).
    """

    def __init__(
        self,
        k_coef_lip=1.0,
        eps_spectral=1e-3,
        eps_bjorck=1e-3,
        beta_bjorck=0.5,
        maxiter_spectral=10,
        maxiter_bjorck=15,
    ):
        self.k_coef_lip = float(k_coef_lip)
        self.eps_spectral = float(eps_spectral)
        self.eps_bjorck = float(eps_bjorck)
        self.beta_bjorck = float(beta_bjorck)
        self.maxiter_spectral = int(maxiter_spectral)
        self.maxiter_bjorck = int(maxiter_bjorck)

    def __call__(self, w):
        columns = int(w.shape[-1])
        matrix = tf.reshape(w, [-1, columns])
        start = tf.fill([1, columns], tf.constant(columns**-0.5, w.dtype))
        scaled, _, _ = spectral_normalization(matrix, start, eps=self.eps_spectral, maxiter=self.maxiter_spectral)
        matrix = bjorck_normalization(scaled, eps=self.eps_bjorck, beta=self.beta_bjorck, maxiter=self.maxiter_bjorck)
        return tf.reshape(matrix * self.k_coef_lip, w.shape)

    def get_config(self):
        return {
            "k_coef_lip": self.k_coef_lip,
            "eps_spectral": self.eps_spectral,
            "eps_bjorck": self.eps_bjorck,
            "beta_bjorck": self.beta_bjorck,
            "maxiter_spectral": self.maxiter_spectral,
            "maxiter_bjorck": self.maxiter_bjorck,
        }


# Keras arguments the Lipschitz layers manage themselves, with the only value
# accepted from a caller (or from a saved config).
_MANAGED_DEFAULTS = {
    "activation": "linear",
    "use_bias": None,
    "kernel_constraint": None,
    "bias_constraint": None,
    "dilation_rate": (1, 1),
    "groups": 1,
    "data_format": "channels_last",
    "activity_regularizer": None,
}


def _pop_managed_arguments(layer_name, kwargs):
    """Removes managed Keras arguments, refusing values that would break the bounds."""
    for key, default in _MANAGED_DEFAULTS.items():
        value = kwargs.pop(key, default)
        if value not in (default, None) and not (key == "dilation_rate" and value in (1, [1, 1])):
            raise ValueError(
                f"{layer_name} does not accept {key}={value!r}: use a lipdp activation layer for "
                "non-linearities, bias_bound=... for a bias and weight_constraint=... for the kernel; "
                "dilation, groups, channels_first and activity regularizers (a data-dependent loss "
                "term outside the loss's bound) are not supported."
            )


def make_kernel_constraint(kind, max_norm):
    """Keras constraint for ``kind`` in :data:`WEIGHT_CONSTRAINTS`."""
    if kind == "orthogonal":
        return OrthogonalConstraint(k_coef_lip=max_norm)
    if kind == "spectral":
        return SpectralNormConstraint(max_norm)
    if kind == "frobenius":
        return NormBallConstraint(max_norm)
    raise ValueError(f"weight_constraint={kind!r} is not one of {WEIGHT_CONSTRAINTS}")


class _LipschitzLinear(DPLayer):
    """Shared bound arithmetic of a linear map applied at ``positions`` places.

    With kernel ``K`` (reshaped to a matrix), ``overlap`` the largest number of
    patches one input entry belongs to, ``P`` the number of output positions
    and ``b`` the bias broadcast to each of them:

    * output bound: ``||K x + b|| <= sqrt(overlap) ||K||_2 ||x|| + sqrt(P) ||b||``;
    * Lipschitz constant: ``sqrt(overlap) ||K||_2``;
    * kernel gradient: ``||sum_p patch_p z_p^T||_F <= sqrt(overlap) ||x|| ||z||``
      (Cauchy-Schwarz over positions);
    * bias gradient: ``||sum_p z_p|| <= sqrt(P) ||z||``.
    """

    overlap = 1

    def _set_up_constraints(self, weight_constraint, lipschitz_target, bias_bound):
        self.weight_constraint = weight_constraint
        self.lipschitz_target = float(lipschitz_target)
        self.bias_bound = None if bias_bound is None else float(bias_bound)
        if self.bias_bound is not None and self.bias_bound < 0:
            raise ValueError(f"bias_bound must be >= 0, got {bias_bound}")

    def _kernel_max_norm(self):
        return self.lipschitz_target / math.sqrt(self.overlap)

    def _pin_input_shape(self, input_shape):
        """Fixes the full input shape: the bias bounds depend on the number of positions."""
        if None in tuple(input_shape[1:]):
            raise ValueError(
                f"{self.name}: every non-batch input dimension must be static "
                f"(the bias bounds count positions), got {tuple(input_shape)}"
            )
        self.input_spec = keras.layers.InputSpec(shape=(None,) + tuple(input_shape[1:]))

    def _project_initial_weights(self):
        self.kernel.assign(self.kernel_constraint(self.kernel))
        if self.use_bias:
            self.bias.assign(self.bias_constraint(self.bias))

    def _bias_norm(self):
        return l2_norm(self.bias) if self.use_bias else as_bound(0.0)

    def lipschitz_constant(self):
        matrix = tf.reshape(self.kernel, [-1, self.kernel.shape[-1]])
        return math.sqrt(self.overlap) * certified_spectral_norm(matrix)

    def output_bound(self, input_bound):
        return self.lipschitz_constant() * input_bound + math.sqrt(self.positions) * self._bias_norm()

    def gradient_bounds(self, input_bound, cotangent_bound):
        bounds = [(self.kernel, math.sqrt(self.overlap) * input_bound * cotangent_bound)]
        if self.use_bias:
            bounds.append((self.bias, math.sqrt(self.positions) * cotangent_bound))
        return bounds

    def get_config(self):
        config = super().get_config()
        for key in _MANAGED_DEFAULTS:
            config.pop(key, None)
        config.update(
            weight_constraint=self.weight_constraint, lipschitz_target=self.lipschitz_target, bias_bound=self.bias_bound
        )
        return config


@keras.utils.register_keras_serializable("lipdp")
class LipschitzDense(_LipschitzLinear, keras.layers.Dense):
    """Dense layer ``y = x K + b`` with a norm-constrained kernel and bias.

    Applied to inputs of shape ``(batch, ..., d)``, the kernel acts at each of
    the ``P`` leading positions (``P = 1`` for 2-D inputs); each input entry is
    in one position, so ``overlap = 1``. Bounds (see ``_LipschitzLinear``):
    output ``||K||_2 ||x|| + sqrt(P) ||b||``, Lipschitz ``||K||_2``, kernel
    gradient ``||x|| ||z||``, bias gradient ``sqrt(P) ||z||``.

    Args:
        units: output width.
        weight_constraint: ``"orthogonal"`` (Bjorck orthonormalisation,
            :class:`OrthogonalConstraint`, gradient norm preserving), ``"spectral"``
            (rescale to spectral norm <= target) or ``"frobenius"`` (project
            onto the Frobenius ball).
        lipschitz_target: the norm the constraint aims for.
        bias_bound: radius of the l2 ball the bias is projected on; ``None``
            means no bias.
    """

    def __init__(
        self,
        units,
        weight_constraint="orthogonal",
        lipschitz_target=1.0,
        bias_bound=None,
        kernel_initializer="orthogonal",
        **kwargs,
    ):
        _pop_managed_arguments(type(self).__name__, kwargs)
        self._set_up_constraints(weight_constraint, lipschitz_target, bias_bound)
        super().__init__(
            units,
            use_bias=self.bias_bound is not None,
            kernel_initializer=kernel_initializer,
            kernel_constraint=make_kernel_constraint(weight_constraint, lipschitz_target),
            bias_constraint=NormBallConstraint(self.bias_bound or 0.0),
            **kwargs,
        )

    def build(self, input_shape):
        refuse_half_precision(self)
        super().build(input_shape)
        self._pin_input_shape(input_shape)
        self.positions = math.prod(int(d) for d in input_shape[1:-1])
        self._project_initial_weights()


@keras.utils.register_keras_serializable("lipdp")
class LipschitzConv2D(_LipschitzLinear, keras.layers.Conv2D):
    """2-D convolution with a norm-constrained kernel, any stride, same/valid padding.

    A convolution is the kernel matrix ``K`` (shape ``(kh*kw*c_in, c_out)``)
    applied to every patch. One input pixel lies in at most
    ``overlap = ceil(kh/sh) * ceil(kw/sw)`` patches (zero padding only adds
    zeros), so ``sum_p ||patch_p||^2 <= overlap ||x||^2`` -- a worst case,
    not an average over border effects. Bounds, with ``P`` output positions:

    * output: ``sqrt(overlap) ||K||_2 ||x|| + sqrt(P) ||b||``;
    * Lipschitz constant: ``sqrt(overlap) ||K||_2``;
    * kernel gradient: ``sqrt(overlap) ||x|| ||z||``;
    * bias gradient: ``sqrt(P) ||z||`` (the bias is broadcast to P positions).

    The constraint targets ``||K||_2 = lipschitz_target / sqrt(overlap)`` so
    that the layer is ``lipschitz_target``-Lipschitz.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="same",
        weight_constraint="orthogonal",
        lipschitz_target=1.0,
        bias_bound=None,
        kernel_initializer="orthogonal",
        **kwargs,
    ):
        _pop_managed_arguments(type(self).__name__, kwargs)
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self._set_up_constraints(weight_constraint, lipschitz_target, bias_bound)
        kernel_size = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,) * 2
        strides = tuple(strides) if not isinstance(strides, int) else (strides,) * 2
        self.overlap = window_overlap(kernel_size, strides)
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=self.bias_bound is not None,
            kernel_initializer=kernel_initializer,
            kernel_constraint=make_kernel_constraint(weight_constraint, self._kernel_max_norm()),
            bias_constraint=NormBallConstraint(self.bias_bound or 0.0),
            **kwargs,
        )

    def build(self, input_shape):
        refuse_half_precision(self)
        super().build(input_shape)
        self._pin_input_shape(input_shape)
        out_shape = self.compute_output_shape(input_shape)
        self.positions = int(out_shape[1]) * int(out_shape[2])
        self._project_initial_weights()

    def convolution_op(self, inputs, kernel):
        """The convolution; an empty batch gives an empty output of the right shape.

        An empty batch runs as one zero stand-in example, dropped after the
        convolution (:func:`lipdp.tf_workarounds.with_stand_in_for_empty_batch`,
        a concatenation that copies the input; :func:`lipdp.tf_workarounds.without_stand_in`,
        a slice that passes the output and its gradient through without a copy).
        """
        batch = tf.shape(inputs)[0]
        inputs = with_stand_in_for_empty_batch(inputs)
        if tuple(self.kernel_size) == (1, 1) and tuple(self.strides) != (1, 1):
            return without_stand_in(subsampled_pointwise(inputs, kernel, self.strides), batch)
        return without_stand_in(super().convolution_op(inputs, kernel), batch)
