"""lipdp: differentially private training of Lipschitz networks without clipping.

Entry points: :class:`DPSequential` / :class:`DPModel` (``make_private`` then
``fit``), :mod:`lipdp.layers`, :mod:`lipdp.losses`, :mod:`lipdp.sensitivity`,
:mod:`lipdp.accounting`, samplers in :mod:`lipdp.sampling`, callbacks in
:mod:`lipdp.callbacks`, data loaders in :mod:`lipdp.data`, gradient mechanisms
in :mod:`lipdp.mechanisms` (certified bounds, or the clipping rules of
:mod:`lipdp.clipping`), errors under :class:`lipdp.errors.LipdpError`; ``lipdp.keras``, the Keras 2
API lipdp runs on (``tf_keras`` on TensorFlow >= 2.16, see :mod:`lipdp.backend`);
reports and audits in :mod:`lipdp.reports` and
:mod:`lipdp.audit` (imported on demand: they need matplotlib/scikit-learn).
"""

from lipdp.backend import keras  # first, before anything imports TensorFlow: decides which Keras (lipdp.backend)

# isort: split
from lipdp import accounting, callbacks, clipping, data, errors, layers, losses, mechanisms, sensitivity
from lipdp.errors import LipdpError
from lipdp.model import DPModel, DPSequential
from lipdp.policy import PrivacyPolicy
from lipdp.sampling import PoissonSampler, ShuffleSampler

__version__ = "0.1.0"

__all__ = [
    "DPModel",
    "DPSequential",
    "LipdpError",
    "PoissonSampler",
    "PrivacyPolicy",
    "ShuffleSampler",
    "accounting",
    "callbacks",
    "clipping",
    "data",
    "errors",
    "keras",
    "layers",
    "losses",
    "mechanisms",
    "sensitivity",
]
