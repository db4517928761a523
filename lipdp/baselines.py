"""Deprecated alias of :mod:`lipdp.clipping` (renamed in 0.2: clipping is a production code path).

The fast-norm functions keep their names; the rule helpers became methods of
the rule classes (``lipdp.clipping.RULES[name](clip_norm, gamma)``:
``sensitivity()``, ``weights(norms)``, ``describe()``, ``gradient_sums``).
"""

import warnings

from lipdp.clipping import *  # noqa: F401,F403
from lipdp.clipping import RULES

warnings.warn("lipdp.baselines is deprecated; use lipdp.clipping", DeprecationWarning, stacklevel=2)

#: The ``clipping=`` values (now ``tuple(lipdp.clipping.RULES)``).
CLIPPING_RULES = tuple(RULES)
