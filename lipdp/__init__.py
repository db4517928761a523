"""lipdp: differentially private training of Lipschitz networks without clipping.

Entry points: :class:`DPSequential` / :class:`DPModel` (``make_private`` then
``fit``), :mod:`lipdp.layers`, :mod:`lipdp.losses`, :mod:`lipdp.sensitivity`,
:mod:`lipdp.accounting`, samplers in :mod:`lipdp.sampling`, callbacks in
:mod:`lipdp.callbacks`.
"""

from lipdp import accounting, callbacks, layers, losses, sensitivity
from lipdp.model import DPModel, DPSequential, PrivacyPolicy
from lipdp.sampling import PoissonSampler, ShuffleSampler

__version__ = "0.1.0"

__all__ = [
    "DPModel", "DPSequential", "PoissonSampler", "PrivacyPolicy", "ShuffleSampler",
    "accounting", "callbacks", "layers", "losses", "sensitivity",
]
