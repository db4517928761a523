"""The statistical test of one-run privacy auditing (Steinke, Nasr & Jagielski, NeurIPS 2023).

``m`` canaries, each included in training with probability 1/2; after
training the auditor guesses ``r`` of them (the top and bottom scores) and
``v`` guesses are right. Under (epsilon, delta)-DP, :func:`p_value` bounds
the probability of ``v`` or more right; :func:`epsilon_lower_bound` is the
largest epsilon the observation rejects at the chosen confidence.
:mod:`lipdp.canaries` inserts and scores the canaries.
"""

import math

import numpy as np

from lipdp.errors import PrivacyParameterError

_EPSILON_STEP, _EPSILON_MAX = 0.05, 100.0


def p_value(m, r, v, epsilon, delta):
    """The paper's bound on ``P[v or more of r guesses right]`` for an (epsilon, delta)-DP run with ``m`` canaries."""
    from scipy import stats

    _check_counts(m, r, v)
    if v == 0:
        return 1.0
    correct = stats.binom(r, 1.0 / (1.0 + math.exp(-epsilon)))
    tail = correct.sf(v - 1)
    if delta == 0:
        return float(min(tail, 1.0))
    shifts = np.arange(1, v + 1)
    slack = np.max((correct.sf(v - shifts - 1) - tail) / shifts)
    return float(min(tail + 2.0 * m * delta * slack, 1.0))


def epsilon_lower_bound(m, r, v, delta, confidence=0.95):
    """The largest epsilon that ``v`` correct guesses out of ``r`` (``m`` canaries) reject at ``confidence``.

    Scans epsilon up from 0 in steps of 0.05 to the first step whose p-value
    exceeds ``beta = 1 - confidence``, then bisects inside it; 0 when even
    epsilon = 0 is not rejected.
    """
    if not 0 < confidence < 1:
        raise PrivacyParameterError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 <= delta < 1:
        raise PrivacyParameterError(f"delta must be in [0, 1), got {delta!r}")
    beta = 1.0 - confidence

    def rejected(epsilon):
        return p_value(m, r, v, epsilon, delta) <= beta

    if not rejected(0.0):
        return 0.0
    low = 0.0
    while rejected(low + _EPSILON_STEP):
        low += _EPSILON_STEP
        if low >= _EPSILON_MAX:
            return _EPSILON_MAX
    high = low + _EPSILON_STEP
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def _check_counts(m, r, v):
    if not (0 <= v <= r <= m and m >= 1):
        raise PrivacyParameterError(f"need 0 <= correct <= guesses <= canaries, got m={m}, r={r}, v={v}")


def guess(scores, included, guesses):
    """``(r, v)``: the ``r/2`` highest ``scores`` guessed included, the ``r/2`` lowest excluded; ``v`` right."""
    scores, included = np.asarray(scores), np.asarray(included, bool)
    half = guesses // 2
    if half < 1 or 2 * half > len(scores):
        raise PrivacyParameterError(f"guesses must be an even number in 2..{len(scores)}, got {guesses!r}")
    order = np.argsort(scores, kind="stable")
    correct = int(np.sum(included[order[-half:]]) + np.sum(~included[order[:half]]))
    return 2 * half, correct


def default_guesses(canaries):
    """Guess a fifth of the canaries (a tenth each way), at least two: fixed before any training."""
    return max(2, 2 * (canaries // 10))


def summarise(kind, scores, included, guesses, epsilon, delta, confidence=0.95, **extra):
    """The JSON-ready audit result of a run's canary ``scores`` against its claimed (epsilon, delta)."""
    m = len(scores)
    r, v = guess(scores, included, guesses)
    bound = epsilon_lower_bound(m, r, v, delta, confidence)
    ceiling = epsilon_lower_bound(m, r, r, delta, confidence)
    return {
        "kind": kind,
        "canaries": m,
        "included": int(np.sum(included)),
        "guesses": r,
        "correct": v,
        "epsilon_claimed": float(epsilon),
        "delta": float(delta),
        "confidence": confidence,
        "epsilon_lower_bound": bound,
        "epsilon_ceiling": ceiling,
        "exceeds_claim": bool(bound > epsilon),
        **extra,
        "note": "a statistical lower bound from one run with inserted canaries (Steinke, Nasr & Jagielski 2023): "
        "above the claim means the claim is wrong; below it proves nothing",
    }


def summary(result):
    """A few human-readable lines for the command line."""
    verdict = (
        "EXCEEDS THE CLAIM: the run is not (claimed eps, delta)-DP (a bug?)"
        if result["exceeds_claim"]
        else "consistent with the claim (a lower bound proves no privacy)"
    )
    return (
        f"{result['kind']} canaries: {result['canaries']} ({result['included']} included), {result['correct']} of "
        f"{result['guesses']} guesses right\nepsilon lower bound {result['epsilon_lower_bound']:.4g} at "
        f"{result['confidence']:.0%} confidence vs claimed ({result['epsilon_claimed']:.4g}, {result['delta']:.3g}): "
        f"{verdict}\n(all guesses right would show {result['epsilon_ceiling']:.4g}"
        f"{'' if result['epsilon_ceiling'] > result['epsilon_claimed'] else ', not above the claim: use more guesses'})"
    )


def draw_inclusion(canaries, rng):
    """Each canary's fair coin (``True``: included), drawn before training."""
    if canaries < 1:
        raise PrivacyParameterError(f"need at least one canary, got {canaries!r}")
    return rng.random(canaries) < 0.5
