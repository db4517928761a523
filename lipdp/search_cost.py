"""What a private hyper-parameter search costs: a random number of trials, each a DP run plus a noisy score.

Papernot & Steinke ("Hyperparameter Tuning with Renyi Differential Privacy",
ICLR 2022) bound the release of the best of ``K`` trials, ``K`` drawn from a
truncated negative binomial or Poisson distribution, by a small multiple of
one trial's Renyi DP; dp-accounting computes it (``RepeatAndSelectDpEvent``,
RDP accountant). A fixed ``K`` composes the trials. :mod:`lipdp.tuning` runs
the search.
"""

import dataclasses
import math
import numbers

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from lipdp import accounting
from lipdp.errors import PrivacyParameterError

#: Named distributions of the number of trials and their dp-accounting shapes (a number >= 0 is a truncated
#: negative binomial of that shape; "fixed" runs exactly ``mean`` trials).
SHAPES = {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}
FIXED = "fixed"
#: dp-accounting's relative tolerance when it inverts the truncated negative binomial's mean (its default).
_GAMMA_TOLERANCE = 1e-9


def _truncated_negative_binomial(rng, eta, gamma):
    """``K >= 1`` with ``P[K=k]`` proportional to ``C(k+eta-1, k) (1-gamma)^k``, by walking the inverse CDF.

    The weights sum to ``gamma^-eta - 1``; the walk takes about ``E[K]`` steps for any ``eta > 0`` (rejecting
    draws of a plain negative binomial until ``K >= 1`` takes ``1 / (1 - gamma^eta)`` tries: endless near 0).
    """
    target = rng.uniform() * math.expm1(-eta * math.log(gamma))
    count, weight = 1, eta * (1 - gamma)
    cumulative = weight
    while cumulative < target and weight > 0:
        weight *= (count + eta) / (count + 1) * (1 - gamma)
        count += 1
        cumulative += weight
    return count


@dataclasses.dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials ``K``: its mean and shape.

    ``shape``: ``"geometric"`` (P[K=k] = g (1-g)^(k-1)), ``"logarithmic"``,
    ``"poisson"`` (K may be 0), a number ``eta >= 0`` (truncated negative
    binomial, Papernot & Steinke's Definition 1; 0 is logarithmic, 1
    geometric), or ``"fixed"`` (exactly ``mean`` trials, composed).
    """

    mean: float
    shape: object = "geometric"

    def __post_init__(self):
        shape = self.shape
        if isinstance(shape, str) and shape not in (*SHAPES, FIXED):
            try:
                shape = float(shape)
            except ValueError:
                raise PrivacyParameterError(
                    f"trial count shape {self.shape!r}: choose {', '.join((*SHAPES, FIXED))} or a number >= 0"
                ) from None
        if not isinstance(shape, str) and (
            isinstance(shape, bool) or not isinstance(shape, numbers.Real) or not 0 <= shape < math.inf
        ):
            raise PrivacyParameterError(f"trial count shape must be a finite number >= 0 or a name, got {shape!r}")
        object.__setattr__(self, "shape", shape)
        mean = self.mean
        if isinstance(mean, bool) or not isinstance(mean, numbers.Real) or not 1 <= mean < math.inf:
            raise PrivacyParameterError(f"the mean number of trials must be a finite number >= 1, got {mean!r}")
        if self.fixed and mean != int(mean):
            raise PrivacyParameterError(f"a fixed number of trials must be an integer, got {mean!r}")

    @property
    def fixed(self):
        return self.shape == FIXED

    @property
    def selects(self):
        """Whether there is a selection to make (a single fixed trial needs no score: it costs one run)."""
        return not (self.fixed and self.mean == 1)

    @property
    def shape_parameter(self):
        """dp-accounting's ``shape``: inf for Poisson, else the truncated negative binomial's ``eta``."""
        return SHAPES.get(self.shape, self.shape)

    def halting_probability(self):
        """The truncated negative binomial's ``gamma`` that ``K`` is drawn with.

        dp-accounting's bound uses ``log(1 / gamma_acc)``, with ``gamma_acc``
        its numerical inverse of the mean (relative tolerance 1e-9, low end),
        and ``log(mean)``. Drawing with ``gamma_acc * (1 + 1e-9)``, at or
        above the bisection's high end, makes both terms at least the drawn
        distribution's: a mean at most ``mean`` and a larger ``gamma``.
        """
        gamma = rdp_privacy_accountant._gamma_truncated_negative_binomial(self.shape_parameter, float(self.mean))
        return min(1.0, gamma * (1 + _GAMMA_TOLERANCE))

    def draw(self, rng):
        """One draw of ``K`` from ``rng`` (a ``numpy.random.Generator`` fed with secret randomness)."""
        if self.fixed:
            return int(self.mean)
        if self.shape_parameter == math.inf:
            return int(rng.poisson(self.mean))
        gamma = self.halting_probability()
        if gamma >= 1:
            return 1
        if self.shape_parameter == 0:  # P[K=k] = (1-gamma)^k / (k log(1/gamma))
            return int(rng.logseries(1 - gamma))
        return _truncated_negative_binomial(rng, self.shape_parameter, gamma)

    def search_event(self, trial_event):
        """The dp-accounting event of the search whose trials are each ``trial_event``."""
        if self.fixed:
            return dp_accounting.SelfComposedDpEvent(trial_event, int(self.mean))
        return dp_event.RepeatAndSelectDpEvent(trial_event, float(self.mean), float(self.shape_parameter))

    def accountant(self, trial_accountant):
        """The accountant of the search: the trials' for a fixed ``K``, else RDP (the only one with the theorem)."""
        return trial_accountant if self.fixed else "rdp"

    def bound(self):
        """Where the search's bound comes from, in words."""
        if self.fixed:
            return "composition of the trials (dp-accounting's SelfComposedDpEvent)"
        return "Papernot & Steinke, ICLR 2022 (Theorems 2 and 6), through dp-accounting's RepeatAndSelectDpEvent"

    def describe(self):
        if self.fixed:
            return f"exactly {int(self.mean)} trial(s), composed"
        name = self.shape if isinstance(self.shape, str) else f"truncated negative binomial (shape {self.shape:g})"
        return f"a random number of trials K ({name}, mean {self.mean:g}) drawn from secret randomness"


def search_epsilon(trial_event, count, delta, trial_accountant="rdp"):
    """Epsilon of a search of ``count`` trials, each ``trial_event``, at ``delta`` (the best trial released)."""
    if not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}")
    accountant = accounting.make_accountant(count.accountant(trial_accountant))
    return float(accountant.compose(count.search_event(trial_event)).get_epsilon(delta))


def score_event(score_noise):
    """The release of a trial's score: a count of correct predictions (sensitivity 1) plus N(0, score_noise^2)."""
    if isinstance(score_noise, bool) or not isinstance(score_noise, numbers.Real) or not 0 < score_noise < math.inf:
        raise PrivacyParameterError(f"score_noise must be a positive finite number, got {score_noise!r}")
    return dp_accounting.GaussianDpEvent(float(score_noise))


def trial_event(run_event, score_noise):
    """A trial: the training run's event (every release it makes), then its noisy score (none if ``None``)."""
    if score_noise is None:
        return run_event
    return dp_accounting.ComposedDpEvent([run_event, score_event(score_noise)])
