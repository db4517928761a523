"""Clipping rules: per-example gradient clipping as a :class:`lipdp.mechanisms.GradientMechanism`.

A DP model built with ``mechanism="flat" | "automatic" | "global"`` trains
ordinary Keras networks by per-example gradient clipping instead of certified
Lipschitz bounds::

    model = lipdp.DPSequential([...any per-sample Keras layers...], mechanism={"name": "global", "clip_norm": 1.0})
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.make_private(sampler, target_epsilon=3.0, epochs=20)
    model.fit(sampler, epochs=20)

Each rule maps the whole-model l2 norm ``||g_i||`` of example ``i``'s
gradient (:mod:`lipdp.clipping.fast_norms`) to a weight ``w_i``; the step
uses ``sum_i w_i g_i``, whose per-example contribution has norm at most the
rule's *sensitivity* ``S``, a whole-contribution
:class:`lipdp.mechanisms.Sensitivity` (noise ``sigma S`` on every
coordinate, under either noise allocation):

* ``"flat"`` (Abadi et al. 2016): ``w_i = min(1, R / ||g_i||)``, ``S = R``.
* ``"automatic"`` (Bu et al. 2022, AUTO-S): ``w_i = 1 / (||g_i|| + gamma)``,
  ``S = 1`` (``||g_i|| / (||g_i|| + gamma) < 1``). ``clip_norm`` is not used:
  a scale ``R`` would only rescale the learning rate.
* ``"global"`` (Bu et al. 2021): ``w_i = 1`` if ``||g_i|| <= R`` else ``0``,
  ``S = R``. Examples are kept unchanged or dropped, never rescaled, so the
  step is an unbiased gradient of the kept examples and the small-loss
  examples are not shrunk relative to each other; Bu et al. show this keeps
  the model's confidence calibrated where flat clipping makes it
  over-confident. It is the better-calibrated choice of the three.

Each rule aims :data:`CLIP_MARGIN` below its sensitivity (float32 norms). A
new rule is a subclass here with a ``name``, :meth:`ClippingRule.weights`,
:meth:`ClippingRule.sensitivity` and :meth:`ClippingRule.describe`, and the
``@mechanisms.register`` decorator; configs, the CLI and saved models pick it up.
Only one whole-model threshold is supported (no per-layer thresholds).
"""

import math
import numbers

import tensorflow as tf

from lipdp import mechanisms
from lipdp.clipping import fast_norms
from lipdp.tf_workarounds import with_stand_in_for_empty_batch

#: The weights aim ``CLIP_MARGIN`` below the sensitivity: the norms come from
#: float32 arithmetic (fast norms agree with exact per-example gradients to
#: ~1e-5 relative), so a contribution computed at exactly ``S`` could exceed it.
CLIP_MARGIN = 1e-4


def _positive_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class ClippingRule(mechanisms.GradientMechanism):
    """Per-example clipping with fast norms; subclasses define the weights and the sensitivity.

    Args:
        clip_norm: the threshold ``R`` (rules that use one).
        gamma: the stability constant of normalising rules.
    """

    def __init__(self, clip_norm=1.0, gamma=0.01):
        self.clip_norm = _positive_finite("clip_norm", clip_norm)
        self.gamma = _positive_finite("gamma", gamma)

    def weights(self, norms):
        """Per-example weights ``w_i`` from the gradient norms, ``w_i ||g_i|| <= (1 - CLIP_MARGIN) S``."""
        raise NotImplementedError

    def sensitivity(self):
        """``S``, the l2 bound of one example's contribution ``w_i g_i``."""
        raise NotImplementedError

    def validate(self, model):
        fast_norms.validate(model)

    def gradient_sums(self, model, x, y, registry=None):
        """``sum_i w_i g_i``: one forward pass and fast norms, then the weighted sums.

        Linear layers sum by book-keeping (no second backward pass); variables
        of fallback layers take the weighted sum of the very per-example
        gradients whose norms were measured; any other variable, a weighted
        backward pass through the same forward pass.
        """
        return _clipped_gradient_sums(self, model, x, y, registry)

    def get_config(self):
        return {"name": self.name, "clip_norm": self.clip_norm, "gamma": self.gamma}

    @property
    def target(self):
        """What the weights aim for: ``(1 - CLIP_MARGIN) S``."""
        return (1.0 - CLIP_MARGIN) * self.sensitivity()


def rule_names():
    """The names of the registered clipping rules."""
    return tuple(name for name, cls in mechanisms.registered().items() if issubclass(cls, ClippingRule))


@fast_norms.no_autograph
def _clipped_gradient_sums(rule, model, x, y, registry):
    count = tf.shape(x)[0]
    # Plain Keras Conv2D breaks on an empty batch: run a stand-in example, weighted 0 below.
    x, y = with_stand_in_for_empty_batch(x), with_stand_in_for_empty_batch(y)
    with tf.GradientTape() as outer:  # recorded, differentiated only for variables the pass does not cover
        forward = fast_norms.forward_with_norms(model, x, y, registry=registry, outer_tape=outer)
        real = tf.cast(tf.range(tf.shape(x)[0]) < count, forward.norms.dtype)  # 0 for an empty batch's stand-in
        weights = tf.stop_gradient(rule.weights(forward.norms) * real)
        weighted = tf.reduce_sum(tf.cast(weights, forward.losses.dtype) * forward.losses)
    sums = forward.weighted_gradient_sums(weights)
    rest = [v for v in model.trainable_variables if v.ref() not in sums]
    if rest:
        grads = outer.gradient(weighted, rest, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        sums.update((v.ref(), g) for v, g in zip(rest, grads))
    return mechanisms.PrivateGradient(
        forward.y_pred[:count],
        forward.losses[:count],
        [tf.convert_to_tensor(sums[v.ref()]) for v in model.trainable_variables],  # densify IndexedSlices
        mechanisms.Sensitivity.of_whole_contribution(rule.sensitivity()),
    )


@mechanisms.register
class FlatClipping(ClippingRule):
    """Abadi et al. 2016: ``w_i = min(1, R / ||g_i||)``, ``S = R``."""

    name = "flat"

    def weights(self, norms):
        target = tf.cast(self.target, norms.dtype)
        return target / tf.maximum(norms, target)

    def sensitivity(self):
        return self.clip_norm

    def describe(self):
        return f"flat per-example clipping to l2 norm R={self.clip_norm:.4g} (sensitivity {self.clip_norm:.4g})"


@mechanisms.register
class AutomaticClipping(ClippingRule):
    """Bu et al. 2022 (AUTO-S): ``w_i = 1 / (||g_i|| + gamma)``, ``S = 1``; ``clip_norm`` unused."""

    name = "automatic"

    def weights(self, norms):
        return tf.cast(self.target, norms.dtype) / (norms + tf.cast(self.gamma, norms.dtype))

    def sensitivity(self):
        return 1.0

    def describe(self):
        return f"automatic per-example normalisation g/(||g|| + {self.gamma:.3g}) (sensitivity 1)"


@mechanisms.register
class GlobalClipping(ClippingRule):
    """Bu et al. 2021: keep an example (``w_i = 1``) if ``||g_i|| <= R``, else drop it; ``S = R``."""

    name = "global"

    def weights(self, norms):
        return tf.cast(norms <= tf.cast(self.target, norms.dtype), norms.dtype)

    def sensitivity(self):
        return self.clip_norm

    def describe(self):
        return (
            f"global per-example clipping (examples with gradient norm above R={self.clip_norm:.4g} dropped; "
            f"sensitivity {self.clip_norm:.4g})"
        )
