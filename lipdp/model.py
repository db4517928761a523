"""DP Keras models: the ordinary batch gradient plus calibrated Gaussian noise.

One obvious entry point::

    model = lipdp.DPSequential([...Lipschitz layers...])
    model.compile(optimizer="adam", loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    sampler = lipdp.PoissonSampler(x_train, y_train, expected_batch_size=256)
    model.make_private(sampler, target_epsilon=3.0, epochs=20, delta=1e-5)
    model.fit(sampler, epochs=20)       # epsilon appears in the progress bar

The train step never computes a per-sample gradient. It differentiates the
*sum* of per-sample losses, asks :mod:`lipdp.sensitivity` for the per-sample
gradient bound of each variable *for the weights in use at this step*, adds
Gaussian noise once, and divides by the *expected* batch size ``q N`` (a
constant: dividing by the realised Poisson batch size would leak it). An
empty batch is a valid step (noise only).

Noise allocation, with ``sigma`` the noise multiplier and ``C_i`` the bound
of variable ``i`` among ``k``:

* ``"global"``: one sensitivity ``C = ||(C_1..C_k)||_2``, std ``sigma C`` on
  every coordinate.
* ``"per-layer"``: variable ``i`` gets std ``sigma sqrt(k) C_i``. ``k``
  Gaussian mechanisms with noise multipliers ``sigma_i = sigma sqrt(k)``
  compose exactly into one with ``1/sigma^2 = sum_i 1/sigma_i^2``, so the
  accountant sees the single multiplier ``sigma`` in both cases.

What is and is not covered: the guarantee covers the weights (every step's
noisy update). The training loss and metrics Keras shows during ``fit`` are
computed on private batches and are **not** covered: do not publish them;
use validation data (held out, not private) for what you report. The noise
comes from ``tf.random.Generator`` (Philox), seedable for tests and *not* a
cryptographically secure sampler. Hyper-parameter searches over private data
are not covered by the guarantee.
"""

import dataclasses
import math
from typing import Optional

import tensorflow as tf

from lipdp import accounting, baselines, sensitivity
from lipdp.errors import LipdpError

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

    def __post_init__(self):
        accounting.validate_delta(self.delta, self.dataset_size)
        if self.noise_allocation not in NOISE_ALLOCATIONS:
            raise ValueError(f"noise_allocation={self.noise_allocation!r} is not one of {NOISE_ALLOCATIONS}")
        accounting.compute_epsilon(**self._accounting_args(steps=1))  # validates the rest

    def _accounting_args(self, steps):
        return dict(sampling_rate=self.sampling_rate, noise_multiplier=self.noise_multiplier, steps=steps,
                    delta=self.delta, accountant=self.accountant, sampling=self.sampling,
                    steps_per_epoch=self.steps_per_epoch)

    def epsilon(self, steps):
        """Epsilon spent after ``steps`` noisy steps."""
        return accounting.compute_epsilon(**self._accounting_args(int(steps)))

    def ledger(self, steps):
        """The dp-accounting event of ``steps`` noisy steps (what happened, for any accountant)."""
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
    def from_sampler(cls, sampler, *, noise_multiplier=None, target_epsilon=None, epochs=None, delta=None,
                     accountant="rdp", noise_allocation="global"):
        """Policy for ``sampler``; the noise is given or calibrated to a target epsilon.

        ``delta`` defaults to ``1 / (10 N)``. With ``target_epsilon``, ``epochs``
        is required and the noise multiplier is the smallest whose epsilon after
        ``epochs * steps_per_epoch`` steps does not exceed the target.
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
                target_epsilon=target_epsilon, delta=delta, sampling_rate=sampler.sampling_rate,
                steps=planned_steps, accountant=accountant, sampling=sampler.kind,
                steps_per_epoch=sampler.steps_per_epoch)
        elif epochs is not None:
            raise ValueError("epochs is only used to calibrate a target_epsilon; the noise multiplier is given")
        return cls(noise_multiplier=float(noise_multiplier), delta=float(delta),
                   dataset_size=int(sampler.dataset_size), sampling=sampler.kind,
                   sampling_rate=float(sampler.sampling_rate),
                   expected_batch_size=float(sampler.expected_batch_size),
                   steps_per_epoch=int(sampler.steps_per_epoch), accountant=accountant,
                   noise_allocation=noise_allocation,
                   target_epsilon=None if target_epsilon is None else float(target_epsilon),
                   planned_steps=planned_steps)


class NotPrivateError(LipdpError, RuntimeError):
    """A DP model was asked to train or account in a way its guarantee does not cover."""


class DPModelMixin:
    """Clipless DP training for Keras models (see the module docstring)."""

    def _init_privacy(self, privacy=None, noise_seed=None, clipping=None, clip_norm=1.0, gamma=0.01,
                      accountable=True):
        self._set_clipping(clipping, clip_norm, gamma)
        self.privacy_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="privacy_steps")
        # The loss tracker sums losses over private Poisson batches (its count is the true number of sampled
        # records): kept out of tracking, so no checkpoint (BackupAndRestore) or saved model holds its state.
        object.__setattr__(self, "_loss_tracker", tf.keras.metrics.Mean(name="loss"))
        self._set_privacy(privacy)
        self._seed_noise(noise_seed)
        self.accountable = bool(accountable)
        # Open only while fit() iterates a sampler (or for good once the model is unaccountable); kept out of
        # tracking like the noise generator, so no checkpoint or saved model carries it.
        object.__setattr__(self, "_sampler_gate", tf.Variable(not self.accountable, trainable=False))

    def allow_unaccounted_steps(self):
        """Escape hatch for benchmarks and tests: lets ``train_on_batch`` and custom loops take steps.

        Such steps do not come from the policy's sampler, so no accountant
        covers them: the model becomes **unaccountable for good** (saved with
        it in its config). ``epsilon()``, ``privacy_state()`` and
        ``privacy_statement()`` then raise :class:`NotPrivateError`.
        """
        self.accountable = False
        self._sampler_gate.assign(True)
        return self

    def _check_accountable(self):
        if not self.accountable:
            raise NotPrivateError(
                "this model is unaccountable: allow_unaccounted_steps() let it take steps outside a sampler's fit, "
                "which no privacy accountant covers; train fresh weights with fit(sampler) for a guarantee")

    def train_on_batch(self, *args, **kwargs):
        """Refused unless :meth:`allow_unaccounted_steps` was called: a fixed batch is no Poisson sample."""
        if self.accountable:
            raise NotPrivateError(
                "train_on_batch takes a step on a batch the accountant never sampled (no amplification applies); "
                "train with fit(sampler), or call model.allow_unaccounted_steps() for benchmarks and tests, "
                "which makes the model unaccountable for good")
        return super().train_on_batch(*args, **kwargs)

    def _set_privacy(self, privacy):
        self.privacy = None if privacy is None else PrivacyPolicy(**privacy)

    def _seed_noise(self, noise_seed):
        """A noise generator that is never saved, restored or derived from anything published.

        Anyone who knows the generator's seed or state can subtract the noise.
        The generator is kept out of Keras/TF tracking (so no checkpoint,
        backup or saved model holds its state), and seeded from OS entropy
        unless ``noise_seed`` is given -- for tests only: a known seed voids
        the guarantee, so it is never written to the model's config.
        """
        if noise_seed is None:
            generator = tf.random.Generator.from_non_deterministic_state()
        else:
            generator = tf.random.Generator.from_seed(noise_seed)
        object.__setattr__(self, "_noise", generator)

    def _set_clipping(self, clipping, clip_norm=1.0, gamma=0.01):
        """``clipping=None``: clipless; else a rule of :mod:`lipdp.baselines` (flat, automatic, global)."""
        self.clipping, self.clip_norm, self.gamma = baselines.check_clipping(clipping, clip_norm, gamma)

    # -- set-up --------------------------------------------------------------
    def make_private(self, sampler, **policy_args):
        """Validates the compiled model and sets its :class:`PrivacyPolicy` for ``sampler``.

        See ``PrivacyPolicy.from_sampler`` for the arguments. Raises
        :class:`lipdp.sensitivity.ModelNotSupportedError` naming any layer,
        loss or setting that has no certified bound. Switches TensorFloat-32
        off process-wide (on GPUs it rounds matmuls to ~1e-3, far above the
        bounds' margin).
        """
        self._validate_for_privacy()
        policy = PrivacyPolicy.from_sampler(sampler, **policy_args)
        if int(self.privacy_steps) > 0 and policy != self.privacy:
            raise ValueError(
                f"these weights already took {int(self.privacy_steps)} private steps under "
                f"{'an unknown policy (weights loaded without it)' if self.privacy is None else self.privacy}; "
                "resume from the saved model with the same policy, or start from fresh weights")
        tf.config.experimental.enable_tensor_float_32_execution(False)
        self.privacy = policy
        return policy

    def _validate_for_privacy(self):
        if getattr(self, "optimizer", None) is None:
            raise NotPrivateError("compile the model (optimizer and a lipdp.losses loss) before make_private")
        if self.clipping is None:
            sensitivity.validate(self)
        else:
            baselines.validate(self)
        if getattr(self, "_steps_per_execution", None) is not None and int(self._steps_per_execution) != 1:
            raise sensitivity.ModelNotSupportedError("steps_per_execution must be 1: one noisy update per step")
        if self.losses:
            raise sensitivity.ModelNotSupportedError(
                "the model has regularization losses; lipdp does not add them to the private gradient")

    def _check_sampler(self, sampler):
        if self.privacy is None:
            raise NotPrivateError("call model.make_private(sampler, ...) before fit")
        found = (sampler.kind, sampler.dataset_size, float(sampler.sampling_rate))
        expected = (self.privacy.sampling, self.privacy.dataset_size, self.privacy.sampling_rate)
        if found != expected:
            raise ValueError(f"the sampler (kind, N, q) = {found} does not match the privacy policy {expected}")

    def fit(self, x=None, epochs=1, callbacks=None, steps_per_epoch=None, **kwargs):
        """Keras ``fit`` on a lipdp sampler (the one given to ``make_private``).

        Arrays and other datasets are refused: their batches are neither
        Poisson-sampled nor known to the accountant. A
        :class:`lipdp.callbacks.PrivacyLedger` is added if none is given.
        """
        from lipdp.callbacks import PrivacyLedger  # callbacks import this module

        if not hasattr(x, "dataset") or not hasattr(x, "kind"):
            raise TypeError(
                "DP training needs a lipdp sampler as x (e.g. lipdp.PoissonSampler(x, y, expected_batch_size=...)):"
                " Keras' own batching is not what the accountant assumes")
        self._check_sampler(x)
        self._validate_for_privacy()  # again: the model may have been recompiled since make_private
        if kwargs.get("batch_size") is not None or kwargs.get("validation_split"):
            raise ValueError("batch_size and validation_split are set by the sampler; pass validation_data instead")
        if steps_per_epoch not in (None, x.steps_per_epoch):
            raise ValueError(f"steps_per_epoch is fixed by the sampler ({x.steps_per_epoch})")
        callbacks = list(callbacks or [])
        if not any(isinstance(c, PrivacyLedger) for c in callbacks):
            callbacks.insert(0, PrivacyLedger())
        self._sampler_gate.assign(True)
        try:
            return super().fit(x.dataset(), epochs=epochs, steps_per_epoch=x.steps_per_epoch,
                               callbacks=callbacks, **kwargs)
        finally:
            self._sampler_gate.assign(not self.accountable)
            self.reset_metrics()  # training metrics are private: keep them out of a saved model

    def steps_left(self):
        """Steps the calibrated plan still allows (``None`` when the noise was given, not calibrated)."""
        if self.privacy.planned_steps is None:
            return None
        return max(0, self.privacy.planned_steps - int(self.privacy_steps))

    def check_sampling_alignment(self):
        """Refuses to start shuffled sampling in the middle of an accounted epoch.

        Each ``fit`` starts a new permutation. Shuffle accounting counts
        ``ceil(steps / steps_per_epoch)`` epochs, which only bounds the
        permutations really used when every ``fit`` starts at an epoch boundary.
        """
        steps, per_epoch = int(self.privacy_steps), self.privacy.steps_per_epoch
        if self.privacy.sampling == "shuffle" and steps % per_epoch:
            raise ValueError(
                f"shuffled sampling cannot resume mid-epoch ({steps} steps, {per_epoch} per epoch): a new "
                "permutation would reuse examples the accountant counts once; use Poisson sampling to stop "
                "and resume anywhere")

    # -- the private step ----------------------------------------------------
    @property
    def metrics(self):
        return [self._loss_tracker] + [m for m in super().metrics if m.name != "loss"]

    def noise_stddevs(self, bounds):
        """Per-variable noise standard deviation on the gradient *sum* (float64)."""
        sigma = self.privacy.noise_multiplier
        if self.privacy.noise_allocation == "global":
            total = tf.norm(tf.stack(bounds))
            return [sigma * total for _ in bounds]
        scale = sigma * math.sqrt(len(bounds))
        return [scale * bound for bound in bounds]

    def noisy_gradients(self, gradient_sums, bounds):
        """Adds noise calibrated to the per-variable ``bounds`` once, then divides by ``q N``."""
        stddevs = self.noise_stddevs(bounds)
        return [
            (g + self._noise.normal(tf.shape(g), dtype=g.dtype) * tf.cast(std, g.dtype))
            / self.privacy.expected_batch_size
            for g, std in zip(gradient_sums, stddevs)
        ]

    def train_step(self, data):
        """One private step on ``data``, counted in ``privacy_steps``.

        The accountant assumes ``data`` was drawn by the policy's sampler, so
        the step runs only inside ``fit(sampler)``: called any other way (a
        custom loop, the compiled train function) it fails before touching
        the weights, unless :meth:`allow_unaccounted_steps` was called.
        """
        if self.privacy is None:
            raise NotPrivateError("call model.make_private(sampler, ...) before fit")
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("sample weights are not supported in DP training")
        gate = tf.debugging.Assert(self._sampler_gate, [
            "lipdp: a private step outside fit(sampler) is not accounted; use fit(sampler) or "
            "model.allow_unaccounted_steps()"])
        with tf.control_dependencies([gate]):  # nothing of the step runs before the check passed
            y_pred, per_sample_loss, gradient_sums, bounds = self.private_gradient_sums(x, y)
            noisy = self.noisy_gradients(gradient_sums, bounds)
            self.optimizer.apply_gradients(zip(noisy, self.trainable_variables))
            self.privacy_steps.assign_add(1)
            return self._update_metrics(y, y_pred, per_sample_loss)

    def private_gradient_sums(self, x, y):
        """The batch's gradient sum and the per-sample bound of each variable's share of it.

        Clipless: the ordinary gradient of the summed per-sample losses, and
        the certified bounds of :mod:`lipdp.sensitivity` for the weights in
        use. Returns ``(y_pred, per_sample_loss, gradient_sums, bounds)``.
        With ``clipping`` set: the clipped sum and the rule's sensitivity
        (:func:`lipdp.baselines.clipped_gradient_sums`).
        """
        if self.clipping is not None:
            return baselines.clipped_gradient_sums(self, x, y)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            per_sample_loss = self.loss.call(y, y_pred)
            loss_sum = tf.reduce_sum(per_sample_loss)
        gradient_sums = tape.gradient(loss_sum, self.trainable_variables)
        return y_pred, per_sample_loss, gradient_sums, sensitivity.gradient_bound_tensors(self)

    def test_step(self, data):
        x, y, _ = tf.keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        return self._update_metrics(y, y_pred, self.loss.call(y, y_pred))

    def _update_metrics(self, y, y_pred, per_sample_loss):
        self._loss_tracker.update_state(per_sample_loss)
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    # -- reporting -----------------------------------------------------------
    def epsilon(self):
        """Epsilon spent so far (at the policy's delta)."""
        self._check_accountable()
        return self.privacy.epsilon(int(self.privacy_steps))

    def privacy_state(self):
        """What ``privacy.json`` records."""
        self._check_accountable()
        steps = int(self.privacy_steps)
        return {"epsilon": self.privacy.epsilon(steps), "steps": steps, **self.privacy.to_dict(),
                "clipping": self.clipping, "ledger": accounting.ledger_to_json(self.privacy.ledger(steps))}

    def privacy_statement(self):
        """A one-paragraph, human-readable statement of the guarantee."""
        state = self.privacy_state()
        mechanism = ("certified per-sample gradient bounds" if self.clipping is None
                     else baselines.describe(self.clipping, self.clip_norm, self.gamma))
        adjacency = ("adding or removing one example" if state["sampling"] == "poisson"
                     else "replacing one example (fixed-size shuffled batches, no amplification by subsampling)")
        return (
            f"The trained weights are ({state['epsilon']:.4g}, {state['delta']:.3g})-differentially private "
            f"with respect to {adjacency}, over {state['steps']} noisy steps on N={state['dataset_size']} examples "
            f"({state['sampling']} sampling, rate q={state['sampling_rate']:.4g}, expected batch "
            f"{state['expected_batch_size']:.1f}), Gaussian noise multiplier {state['noise_multiplier']:.4g} "
            f"({state['noise_allocation']} allocation) on {mechanism}, accounted with "
            f"dp-accounting's {state['accountant'].upper()} accountant. Training losses and metrics shown during "
            "fit are computed on private data and are not covered; hyper-parameter selection is not covered.")

    def get_config(self):
        privacy = None if self.privacy is None else self.privacy.to_dict()
        return {**super().get_config(), "privacy": privacy, "accountable": self.accountable,
                "clipping": self.clipping, "clip_norm": self.clip_norm, "gamma": self.gamma}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        privacy = config.pop("privacy", None)
        accountable = config.pop("accountable", True)
        clipping = {key: config.pop(key) for key in ("clipping", "clip_norm", "gamma") if key in config}
        model = super().from_config(config, custom_objects)
        model._set_privacy(privacy)
        model._set_clipping(**clipping)
        if not accountable:
            model.allow_unaccounted_steps()
        return model


@tf.keras.utils.register_keras_serializable("lipdp")
class DPModel(DPModelMixin, tf.keras.Model):
    """Functional ``tf.keras.Model`` (DAGs, residual blocks) trained with clipless DP.

    ``clipping="flat" | "automatic" | "global"`` (with ``clip_norm``, ``gamma``)
    trains by per-example clipping instead: see :mod:`lipdp.baselines`.
    """

    def __init__(self, inputs, outputs, name=None, trainable=True, **kwargs):
        # Functional's exact signature, so Keras saves and revives it as a graph.
        privacy, noise_seed = kwargs.pop("privacy", None), kwargs.pop("noise_seed", None)
        clipping = {key: kwargs.pop(key) for key in ("clipping", "clip_norm", "gamma") if key in kwargs}
        super().__init__(inputs, outputs, name=name, trainable=trainable, **kwargs)
        self._init_privacy(privacy, noise_seed, **clipping)


@tf.keras.utils.register_keras_serializable("lipdp")
class DPSequential(DPModelMixin, tf.keras.Sequential):
    """``tf.keras.Sequential`` trained with clipless DP (or clipping: see :class:`DPModel`)."""

    def __init__(self, layers=None, name=None, privacy=None, noise_seed=None, clipping=None, clip_norm=1.0,
                 gamma=0.01):
        super().__init__(layers=layers, name=name)
        self._init_privacy(privacy, noise_seed, clipping, clip_norm, gamma)
