"""Lipschitz layers that state their privacy bounds (see :mod:`lipdp.layers.base`)."""

from lipdp.layers.activations import Abs, FullSort, GroupSort, ReLU
from lipdp.layers.base import DPLayer, StepRelease, certified_spectral_norm, window_overlap
from lipdp.layers.frontends import ChannelStandardization, FrontEnd, Scattering2D, cached_features
from lipdp.layers.linear import (
    LipschitzConv2D,
    LipschitzDense,
    NormBallConstraint,
    SpectralNormConstraint,
)
from lipdp.layers.pooling import GlobalL2NormPooling2D, L2NormPooling2D, MaxPooling2D
from lipdp.layers.structure import (
    AdaptiveClipGradient,
    Add,
    Average,
    ClipGradient,
    Flatten,
    InputNormClip,
    LayerCentering,
    Reshape,
)

__all__ = [
    "Abs",
    "AdaptiveClipGradient",
    "ChannelStandardization",
    "FrontEnd",
    "Scattering2D",
    "cached_features",
    "Add",
    "Average",
    "ClipGradient",
    "DPLayer",
    "StepRelease",
    "Flatten",
    "FullSort",
    "GlobalL2NormPooling2D",
    "GroupSort",
    "InputNormClip",
    "L2NormPooling2D",
    "LayerCentering",
    "LipschitzConv2D",
    "LipschitzDense",
    "MaxPooling2D",
    "NormBallConstraint",
    "ReLU",
    "Reshape",
    "SpectralNormConstraint",
    "certified_spectral_norm",
    "window_overlap",
]
