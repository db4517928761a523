"""Clipping-based DP-SGD in the same framework: rules (:mod:`.rules`) and fast per-example norms (:mod:`.fast_norms`,
per-layer rules in :mod:`.layer_rules`).

``DPSequential(..., mechanism={"name": "flat" | "automatic" | "global", "clip_norm": R})``
builds the rule of that name; each is a :class:`lipdp.mechanisms.GradientMechanism`
sharing the models' noise, sampling and accounting with clipless training.
"""

from lipdp.clipping.fast_norms import forward_with_norms, per_example_gradient_norms, per_sample_losses, validate
from lipdp.clipping.layer_rules import conv2d_squared_norms, make_layer_registry
from lipdp.clipping.rules import (
    CLIP_MARGIN,
    AutomaticClipping,
    ClippingRule,
    FlatClipping,
    GlobalClipping,
    rule_names,
)

__all__ = [
    "CLIP_MARGIN",
    "AutomaticClipping",
    "ClippingRule",
    "FlatClipping",
    "GlobalClipping",
    "conv2d_squared_norms",
    "forward_with_norms",
    "make_layer_registry",
    "per_example_gradient_norms",
    "per_sample_losses",
    "rule_names",
    "validate",
]
