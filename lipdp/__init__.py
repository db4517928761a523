"""lipdp: differentially private training of Lipschitz networks without clipping.

Entry points: :class:`DPSequential` / :class:`DPModel` (``make_private`` then
``fit``), :mod:`lipdp.layers`, :mod:`lipdp.losses`, :mod:`lipdp.sensitivity`,
:mod:`lipdp.accounting`, samplers in :mod:`lipdp.sampling`, callbacks in
:mod:`lipdp.callbacks`, data loaders in :mod:`lipdp.data`, clipping baselines
in :mod:`lipdp.baselines`; reports and audits in :mod:`lipdp.reports` and
:mod:`lipdp.audit` (imported on demand: they need matplotlib/scikit-learn).
"""

from lipdp import accounting, baselines, callbacks, data, layers, losses, sensitivity
from lipdp.model import DPModel, DPSequential, PrivacyPolicy
from lipdp.sampling import PoissonSampler, ShuffleSampler

__version__ = "0.1.0"

__all__ = [
    "DPModel", "DPSequential", "PoissonSampler", "PrivacyPolicy", "ShuffleSampler",
    "accounting", "baselines", "callbacks", "data", "layers", "losses", "sensitivity",
]
