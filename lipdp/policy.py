"""The privacy policy of a training run: sampling, noise, releases and budget, accounted by :mod:`lipdp.accounting`."""

import dataclasses
import math
from typing import Optional, Tuple

from lipdp import accounting
from lipdp.errors import PrivacyParameterError

#: How the noise of per-variable sensitivities is spread (see :meth:`lipdp.mechanisms.Sensitivity.noise_stddevs`).
NOISE_ALLOCATIONS = ("global", "per-layer")


@dataclasses.dataclass(frozen=True)
class PrivacyPolicy:
    """Everything the accountant needs to know about a training run.

    With a ``target_epsilon``, ``planned_steps`` is the number of steps the
    noise was calibrated for: training stops there (see
    :class:`lipdp.callbacks.PrivacyLedger`), so the target is never exceeded.
    """

    noise_multiplier: float
    delta: float
    dataset_size: int
    sampling: str
    sampling_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    accountant: str = "rdp"
    noise_allocation: str = "global"
    target_epsilon: Optional[float] = None
    planned_steps: Optional[int] = None
    quantile_noise_share: Optional[float] = None
    #: Noise multipliers of the statistics released once before training (see :mod:`lipdp.statistics`).
    release_noise_multipliers: Tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "release_noise_multipliers", tuple(float(z) for z in self.release_noise_multipliers))
        accounting.validate_delta(self.delta, self.dataset_size)
        if self.noise_allocation not in NOISE_ALLOCATIONS:
            raise ValueError(f"noise_allocation={self.noise_allocation!r} is not one of {NOISE_ALLOCATIONS}")
        if self.quantile_noise_share is not None:
            if not 0.0 < self.quantile_noise_share < 1.0:
                raise PrivacyParameterError(
                    f"quantile_noise_share must be in (0, 1), got {self.quantile_noise_share!r}"
                )
            if self.sampling != "poisson":
                raise PrivacyParameterError("adaptive clipping (quantile_noise_share) needs Poisson sampling")
        accounting.compute_epsilon(**self._accounting_args(steps=1))  # validates the rest

    @property
    def gradient_noise_multiplier(self):
        """The multiplier of the gradient noise: all of ``noise_multiplier``, or its share with the quantile release.

        Each step of adaptive clipping releases two Gaussian mechanisms on the
        same Poisson batch: the gradient sum (multiplier ``z_g``) and the count
        of examples under the clipping threshold (sensitivity 1, multiplier
        ``z_b``). Together they are exactly one Gaussian mechanism of
        multiplier ``z`` with ``1/z^2 = 1/z_g^2 + 1/z_b^2`` (a Gaussian vector
        mechanism on the concatenated release), which is the
        ``PoissonSampled(q, Gaussian(z))`` event the accountant composes.
        With share ``r``: ``z_g = z / sqrt(1 - r)`` and ``z_b = z / sqrt(r)``.
        """
        if self.quantile_noise_share is None:
            return self.noise_multiplier
        return self.noise_multiplier / math.sqrt(1.0 - self.quantile_noise_share)

    @property
    def quantile_noise_multiplier(self):
        """``z_b``: the noise multiplier (= std, sensitivity 1) of the released count (see above)."""
        if self.quantile_noise_share is None:
            raise PrivacyParameterError("this policy has no quantile release (quantile_noise_share is None)")
        return self.noise_multiplier / math.sqrt(self.quantile_noise_share)

    def _accounting_args(self, steps):
        return dict(
            sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier,
            steps=steps,
            delta=self.delta,
            accountant=self.accountant,
            sampling=self.sampling,
            steps_per_epoch=self.steps_per_epoch,
            releases=self.release_noise_multipliers,
        )

    def epsilon(self, steps):
        """Epsilon spent after ``steps`` noisy steps."""
        return accounting.compute_epsilon(**self._accounting_args(int(steps)))

    def ledger(self, steps):
        """The dp-accounting event of the releases and ``steps`` noisy steps (what happened, for any accountant)."""
        args = self._accounting_args(int(steps))
        for key in ("delta", "accountant"):
            args.pop(key)
        return accounting.training_event(**args)

    def max_steps(self, epsilon_budget):
        """The largest number of steps whose epsilon stays within the budget."""
        args = self._accounting_args(steps=0)
        args.pop("steps")
        return accounting.max_steps(epsilon_budget=epsilon_budget, **args)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_sampler(
        cls,
        sampler,
        *,
        noise_multiplier=None,
        target_epsilon=None,
        epochs=None,
        delta=None,
        accountant="rdp",
        noise_allocation="global",
        quantile_noise_share=None,
        releases=(),
    ):
        """Policy for ``sampler``; the noise is given or calibrated to a target epsilon.

        ``delta`` defaults to ``1 / (10 N)``. With ``target_epsilon``, ``epochs``
        is required and the noise multiplier is the smallest whose epsilon after
        the ``releases`` (noise multipliers of statistics released before
        training) and ``epochs * steps_per_epoch`` steps does not exceed the
        target.
        """
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        delta = 0.1 / sampler.dataset_size if delta is None else delta
        accounting.validate_delta(delta, sampler.dataset_size)
        planned_steps = None
        if target_epsilon is not None:
            if not epochs:
                raise ValueError("target_epsilon needs the number of epochs to calibrate the noise")
            planned_steps = int(epochs) * sampler.steps_per_epoch
            noise_multiplier = accounting.calibrate_noise_multiplier(
                target_epsilon=target_epsilon,
                delta=delta,
                sampling_rate=sampler.sampling_rate,
                steps=planned_steps,
                accountant=accountant,
                sampling=sampler.kind,
                steps_per_epoch=sampler.steps_per_epoch,
                releases=releases,
            )
        elif epochs is not None:
            raise ValueError("epochs is only used to calibrate a target_epsilon; the noise multiplier is given")
        return cls(
            noise_multiplier=float(noise_multiplier),
            delta=float(delta),
            dataset_size=int(sampler.dataset_size),
            sampling=sampler.kind,
            sampling_rate=float(sampler.sampling_rate),
            expected_batch_size=float(sampler.expected_batch_size),
            steps_per_epoch=int(sampler.steps_per_epoch),
            accountant=accountant,
            noise_allocation=noise_allocation,
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
            planned_steps=planned_steps,
            quantile_noise_share=None if quantile_noise_share is None else float(quantile_noise_share),
            release_noise_multipliers=tuple(releases),
        )
