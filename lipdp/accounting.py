"""Privacy accounting for DP-SGD training runs, built on ``dp_accounting``.

Two notions are kept apart:

* **events** (:class:`dp_accounting.DpEvent`) describe *what happened*: which
  mechanism ran, on which sample of the data, how many times. They carry no
  privacy numbers and can be stored (see :func:`lipdp.ledger.ledger_to_json`).
* **accountants** (:class:`dp_accounting.PrivacyAccountant`) decide *how to
  bound* a composition of events: ``"rdp"`` (Renyi DP, fast, slightly loose)
  or ``"pld"`` (privacy loss distributions, tighter, slower). Both are used
  with their default add-or-remove-one neighbouring relation.

One training step adds Gaussian noise of standard deviation
``noise_multiplier * C`` to a sum of per-example gradients of norm at most
``C``. How steps turn into an event depends on how batches are sampled:

* ``"poisson"``: each example joins each batch independently with probability
  ``sampling_rate``. Privacy is amplified by subsampling; adjacency is
  add-or-remove-one example. Event:
  ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``.
* ``"shuffle"``: each epoch shuffles the data and cuts it into fixed-size
  batches, so every example is in exactly one batch per epoch and the batch
  size reveals the dataset size. Adjacency is therefore replace-one (dataset
  size fixed), under which one example can move a gradient sum by ``2 C``:
  the sensitivity doubles. No amplification by subsampling is claimed (it
  would rest on the shuffle staying secret). Within an epoch an example
  touches one step only, so each epoch started counts as one
  ``Gaussian(sigma / 2)``, composed over
  ``ceil(steps / steps_per_epoch)`` epochs. Epsilon is thus constant within an
  epoch and jumps when a new epoch begins.

Statistics released once before training (e.g. the feature means of
:mod:`lipdp.statistics`) are Gaussian mechanisms on the whole data set: each
is ``releases`` entry ``z`` (its noise over its sensitivity), composed with
the steps as the sampler's ``release_event(z)``.

All public functions take keyword-only arguments and raise
:class:`PrivacyParameterError` on invalid or impossible requests.
"""

import functools
import logging
import math
import numbers

import dp_accounting

from lipdp.errors import PrivacyParameterError
from lipdp.sampling import SAMPLERS, sampler_class

#: The sampling kinds the accountant knows (the registered samplers).
SAMPLINGS = tuple(SAMPLERS)


class _UnconvergedOrderFilter(logging.Filter):
    """dp-accounting >= 0.6 logs a warning for each small RDP order whose series does not converge, on most
    calls for large sampling rates. The order is then left out of the minimum over orders (its RDP counts as
    infinite), so the epsilon stays a valid bound: the note is dropped, not the order."""

    def filter(self, record):
        return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_UnconvergedOrderFilter())


ACCOUNTANTS = ("rdp", "pld")

_MAX_NOISE_MULTIPLIER = 1e4
# Calibration does not search below this: such noise gives epsilons in the
# hundreds, and PLD accounting becomes very slow there.
_MIN_NOISE_MULTIPLIER = 1 / 16


def _check_choice(name, value, choices):
    if value not in choices:
        raise PrivacyParameterError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise PrivacyParameterError(f"{name} must be a positive finite number, got {value!r}")


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PrivacyParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_delta(delta):
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta!r}")


def _check_schedule(sampling_rate, steps, sampling, steps_per_epoch):
    """Validates the parameters shared by every function describing a run."""
    sampler_class(sampling)  # a known kind
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Real) or not 0 < sampling_rate <= 1:
        raise PrivacyParameterError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    _check_count("steps", steps, 0)
    if steps_per_epoch is not None:
        _check_count("steps_per_epoch", steps_per_epoch, 1)


def make_accountant(accountant="rdp"):
    """Returns a fresh, empty privacy accountant.

    Args:
        accountant: ``"rdp"`` (:class:`dp_accounting.rdp.RdpAccountant`, with
            its default orders: 1.1 to 10.9 by 0.1, 11 to 63, and 128 to 1024
            by powers of two) or ``"pld"``
            (:class:`dp_accounting.pld.PLDAccountant`, discretisation 1e-4).

    Raises:
        PrivacyParameterError: ``accountant`` is unknown.
    """
    _check_choice("accountant", accountant, ACCOUNTANTS)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant()


def training_event(*, sampling_rate, noise_multiplier, steps, sampling="poisson", steps_per_epoch=None, releases=()):
    """Describes ``steps`` noisy gradient steps, after the ``releases``, as a ``DpEvent``.

    Args:
        sampling_rate: Poisson inclusion probability q in (0, 1]; only
            validated for ``"shuffle"``, whose event does not depend on it.
        noise_multiplier: Noise standard deviation over the per-example
            gradient norm bound (add-or-remove-one sensitivity).
        steps: Number of steps taken, an integer >= 0.
        sampling: ``"poisson"`` or ``"shuffle"`` (see the module docstring).
        steps_per_epoch: Steps in one epoch; required for ``"shuffle"``.
        releases: Noise multipliers of Gaussian releases of the whole data
            set made once before training (add-or-remove-one sensitivity).

    Returns:
        The event: the releases then the steps, composed; ``NoOpDpEvent``
        when there is neither.

    Raises:
        PrivacyParameterError: A parameter is invalid.
    """
    _check_schedule(sampling_rate, steps, sampling, steps_per_epoch)
    _check_positive("noise_multiplier", noise_multiplier)
    for release in releases:
        _check_positive("release noise multiplier", release)
    sampler = sampler_class(sampling)
    events = [sampler.release_event(release) for release in releases]
    if steps > 0:
        events.append(
            sampler.dp_event(
                sampling_rate=sampling_rate,
                noise_multiplier=noise_multiplier,
                steps=steps,
                steps_per_epoch=steps_per_epoch,
            )
        )
    if not events:
        return dp_accounting.NoOpDpEvent()
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def compute_epsilon(
    *,
    sampling_rate,
    noise_multiplier,
    steps,
    delta,
    accountant="rdp",
    sampling="poisson",
    steps_per_epoch=None,
    releases=(),
):
    """Epsilon spent by a training run, at the given delta.

    Args:
        sampling_rate, noise_multiplier, steps, sampling, steps_per_epoch, releases: As in :func:`training_event`.
        delta: Target delta in (0, 1).
        accountant: ``"rdp"`` or ``"pld"``.

    Returns:
        Epsilon as a float (0.0 when ``steps == 0`` and nothing was released).

    Raises:
        PrivacyParameterError: A parameter is invalid.
    """
    _check_delta(delta)
    event = training_event(
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        steps=steps,
        sampling=sampling,
        steps_per_epoch=steps_per_epoch,
        releases=releases,
    )
    return float(make_accountant(accountant).compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon,
    delta,
    sampling_rate,
    steps,
    accountant="rdp",
    sampling="poisson",
    steps_per_epoch=None,
    releases=(),
):
    """Smallest noise multiplier whose run spends at most ``target_epsilon``.

    The search is done by ``dp_accounting.calibrate_dp_mechanism`` (Brent's
    method, tolerance 1e-6 in the noise multiplier) on a bracket found by
    doubling/halving from 1. The result is conservative: its epsilon is
    <= ``target_epsilon``. Noise multipliers below 1/16 are not searched: if
    1/16 already meets the target, 1/16 is returned.

    Args:
        target_epsilon: Epsilon budget of the whole run, > 0.
        delta: Target delta in (0, 1).
        sampling_rate, steps, sampling, steps_per_epoch, releases: As in
            :func:`training_event`; ``steps`` must be >= 1. The releases'
            share of the budget is spent first: the steps get the rest.
        accountant: ``"rdp"`` or ``"pld"``.

    Returns:
        The noise multiplier, a float.

    Raises:
        PrivacyParameterError: A parameter is invalid, or no noise multiplier
            up to 1e4 reaches the target.
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(delta)
    _check_schedule(sampling_rate, steps, sampling, steps_per_epoch)
    _check_count("steps", steps, 1)
    _check_choice("accountant", accountant, ACCOUNTANTS)
    schedule = dict(
        sampling_rate=sampling_rate, steps=steps, sampling=sampling, steps_per_epoch=steps_per_epoch, releases=releases
    )
    make_event = functools.partial(training_event, **schedule)

    def epsilon(noise_multiplier):
        return compute_epsilon(noise_multiplier=noise_multiplier, delta=delta, accountant=accountant, **schedule)

    if releases:
        released = compute_epsilon(noise_multiplier=1.0, delta=delta, accountant=accountant, **{**schedule, "steps": 0})
        if released >= target_epsilon:
            raise PrivacyParameterError(
                f"the statistics released before training (noise multipliers {list(releases)}) alone spend "
                f"epsilon={released:.4g} >= target_epsilon={target_epsilon}; release them with more noise"
            )
    low = high = 1.0
    if epsilon(high) > target_epsilon:
        while high < _MAX_NOISE_MULTIPLIER:
            low, high = high, min(2 * high, _MAX_NOISE_MULTIPLIER)
            if epsilon(high) <= target_epsilon:
                break
        else:
            raise PrivacyParameterError(
                f"target_epsilon={target_epsilon} cannot be reached over {steps} steps at delta={delta}, even with "
                f"noise_multiplier={_MAX_NOISE_MULTIPLIER:g}; train for fewer steps/epochs or allow a larger epsilon"
            )
    else:
        while low > _MIN_NOISE_MULTIPLIER:
            low, high = low / 2, low
            if epsilon(low) > target_epsilon:
                break
        else:
            return _MIN_NOISE_MULTIPLIER
    noise_multiplier = float(
        dp_accounting.calibrate_dp_mechanism(
            functools.partial(make_accountant, accountant),
            lambda sigma: make_event(noise_multiplier=sigma),
            target_epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(low, high),
        )
    )
    if epsilon(noise_multiplier) > target_epsilon:
        raise RuntimeError(
            f"calibrate_dp_mechanism returned noise_multiplier={noise_multiplier}, which exceeds "
            f"target_epsilon={target_epsilon}"
        )
    return noise_multiplier


def _largest_within(epsilon_of, budget, infeasible):
    """Largest integer n in [0, infeasible) with ``epsilon_of(n) <= budget``.

    Assumes ``epsilon_of`` is non-decreasing and ``epsilon_of(0) <= budget``;
    ``epsilon_of`` is only evaluated below ``infeasible``. Exponential search,
    then bisection, keeping ``epsilon_of(feasible) <= budget`` and
    ``infeasible`` either the bound given or a value over budget.
    """
    feasible, probe = 0, 1
    while probe < infeasible and epsilon_of(probe) <= budget:
        feasible, probe = probe, 2 * probe
    infeasible = min(probe, infeasible)
    while infeasible - feasible > 1:
        middle = (feasible + infeasible) // 2
        if epsilon_of(middle) <= budget:
            feasible = middle
        else:
            infeasible = middle
    return feasible


def max_steps(
    *,
    epsilon_budget,
    delta,
    sampling_rate,
    noise_multiplier,
    accountant="rdp",
    sampling="poisson",
    steps_per_epoch=None,
    releases=(),
    upper=10**7,
):
    """Largest number of steps that spends at most ``epsilon_budget``.

    The result ``s`` is exact: ``eps(s) <= epsilon_budget < eps(s + 1)``,
    unless ``s == upper``. It is found by integer exponential search and
    bisection over :func:`compute_epsilon` (for ``"shuffle"``, over whole
    epochs, since epsilon only changes when an epoch starts).
    ``dp_accounting.calibrate_dp_mechanism(discrete=True)`` is not used: it
    rounds a float root found to within 0.5, which does not guarantee this
    exactness.

    Args:
        epsilon_budget: Epsilon budget, > 0.
        delta: Target delta in (0, 1).
        sampling_rate, noise_multiplier, sampling, steps_per_epoch, releases:
            As in :func:`training_event`.
        accountant: ``"rdp"`` or ``"pld"``.
        upper: Largest step count considered.

    Returns:
        The number of steps, an int (0 if a single step exceeds the budget).

    Raises:
        PrivacyParameterError: A parameter is invalid.
    """
    _check_positive("epsilon_budget", epsilon_budget)
    _check_delta(delta)
    _check_positive("noise_multiplier", noise_multiplier)
    _check_count("upper", upper, 1)
    _check_schedule(sampling_rate, upper, sampling, steps_per_epoch)
    _check_choice("accountant", accountant, ACCOUNTANTS)
    unit = sampler_class(sampling).accounting_unit(steps_per_epoch)

    def epsilon(steps):
        return compute_epsilon(
            sampling_rate=sampling_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            delta=delta,
            accountant=accountant,
            sampling=sampling,
            steps_per_epoch=steps_per_epoch,
            releases=releases,
        )

    if releases and epsilon(0) > epsilon_budget:
        raise PrivacyParameterError(
            f"the statistics released before training (noise multipliers {list(releases)}) already spend "
            f"epsilon={epsilon(0):.4g} > epsilon_budget={epsilon_budget}; release them with more noise"
        )
    # Search [0, ceil(upper / unit)] without evaluating the (slow, for PLD) far end first.
    units = _largest_within(lambda n: epsilon(n * unit), epsilon_budget, -(-int(upper) // unit) + 1)
    return min(units * unit, int(upper))


def epochs_for_budget(
    *,
    epsilon_budget,
    delta,
    sampling_rate,
    noise_multiplier,
    steps_per_epoch,
    accountant="rdp",
    sampling="poisson",
    releases=(),
):
    """Number of whole epochs that fit in ``epsilon_budget``.

    Args:
        steps_per_epoch: Steps in one epoch (required for both samplings).
        Others: As in :func:`max_steps`.

    Returns:
        ``max_steps(...) // steps_per_epoch``.
    """
    _check_count("steps_per_epoch", steps_per_epoch, 1)
    steps = max_steps(
        epsilon_budget=epsilon_budget,
        delta=delta,
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        accountant=accountant,
        sampling=sampling,
        steps_per_epoch=steps_per_epoch,
        releases=releases,
    )
    return steps // steps_per_epoch


def validate_delta(delta, dataset_size):
    """Checks that ``0 < delta < 1 / dataset_size``.

    A delta of 1/N or more is met by a mechanism that publishes one random
    training example in the clear, so it protects nobody.

    Raises:
        PrivacyParameterError: ``delta`` or ``dataset_size`` is invalid.
    """
    _check_count("dataset_size", dataset_size, 1)
    _check_delta(delta)
    if delta >= 1 / dataset_size:
        raise PrivacyParameterError(
            f"delta={delta!r} must be below 1/dataset_size = {1 / dataset_size:.3g}: with delta >= 1/N, releasing one "
            f"training example outright satisfies (0, delta)-DP; use e.g. delta <= 1/(10 N) = {0.1 / dataset_size:.3g}"
        )
