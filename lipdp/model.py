"""DP Keras models: the ordinary batch gradient plus calibrated Gaussian noise.

One obvious entry point::

    model = lipdp.DPSequential([...Lipschitz layers...])
    model.compile(optimizer="adam", loss=lipdp.losses.TauCategoricalCrossentropy(8.0))
    sampler = lipdp.PoissonSampler(x_train, y_train, expected_batch_size=256)
    model.make_private(sampler, target_epsilon=3.0, epochs=20, delta=1e-5)
    model.fit(sampler, epochs=20)       # epsilon appears in the progress bar

The train step never computes a per-sample gradient itself: the model's
:class:`lipdp.mechanisms.GradientMechanism` returns the batch's gradient
*sum* and its sensitivity -- clipless, the ordinary gradient of the summed
per-sample losses and the certified bounds of :mod:`lipdp.sensitivity` for
the weights in use at this step; with ``mechanism="flat"`` (or another
:mod:`lipdp.clipping` rule), per-example clipping. The model adds Gaussian noise once (allocation:
:meth:`lipdp.mechanisms.Sensitivity.noise_stddevs`) and divides by the
*expected* batch size ``q N`` (a constant: dividing by the realised Poisson
batch size would leak it). An empty batch is a valid step (noise only).

What is and is not covered: the guarantee covers the weights (every step's
noisy update). The training loss and metrics Keras shows during ``fit`` are
computed on private batches and are **not** covered: do not publish them;
use validation data (held out, not private) for what you report. The noise
comes from ``tf.random.Generator`` (Philox), seedable for tests and *not* a
cryptographically secure sampler. Hyper-parameter searches over private data
are not covered by the guarantee.
"""

import contextlib

import tensorflow as tf

from lipdp import backend, distribute, independence, ledger, mechanisms, robustness, sampling
from lipdp.backend import keras
from lipdp.errors import ModelNotSupportedError, NotPrivateError
from lipdp.policy import PrivacyPolicy
from lipdp.records import (
    check_releases_accounted,
    check_same_record,
    check_step_releases,
    fingerprint,
    model_releases,
    privacy_record,
    statement,
    step_release_layers,
)


class DPModelMixin:
    """Clipless DP training for Keras models (see the module docstring)."""

    def _init_privacy(
        self,
        privacy=None,
        noise_seed=None,
        mechanism=None,
        accountable=True,
        microbatch_size=None,
    ):
        self.mechanism = mechanisms.get(mechanism)
        if microbatch_size is not None and (isinstance(microbatch_size, bool) or int(microbatch_size) < 1):
            raise ValueError(f"microbatch_size must be a positive integer, got {microbatch_size!r}")
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        # One count per global step: under a tf.distribute strategy, the first replica's update is kept. Read it
        # with steps_taken (an int on every path; int() of a distributed variable fails).
        self.privacy_steps = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="privacy_steps",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # A fingerprint of the policy and mechanism that took those steps (privacy_record), saved and restored with
        # them by every checkpoint, backup and saved model: a restore cannot pair the steps with another policy.
        self.privacy_fingerprint = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="privacy_fingerprint",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # The loss tracker sums losses over private Poisson batches (its count is the true number of sampled
        # records): kept out of tracking, so no checkpoint (BackupAndRestore) or saved model holds its state.
        object.__setattr__(self, "_loss_tracker", keras.metrics.Mean(name="loss"))
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
                "which no privacy accountant covers; train fresh weights with fit(sampler) for a guarantee"
            )

    def train_on_batch(self, *args, **kwargs):
        """Refused unless :meth:`allow_unaccounted_steps` was called: a fixed batch is no Poisson sample."""
        if self.accountable:
            raise NotPrivateError(
                "train_on_batch takes a step on a batch the accountant never sampled (no amplification applies); "
                "train with fit(sampler), or call model.allow_unaccounted_steps() for benchmarks and tests, "
                "which makes the model unaccountable for good"
            )
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

    # -- set-up --------------------------------------------------------------
    def make_train_function(self, force=False):
        """Keras' train function, once the compiled :class:`lipdp.robustness.CertifiedAccuracy` metrics are bound."""
        robustness.bind_metrics(self, backend.compiled_user_metrics(self))
        return super().make_train_function(force)

    def make_test_function(self, force=False):
        """Keras' test function, once the compiled :class:`lipdp.robustness.CertifiedAccuracy` metrics are bound."""
        robustness.bind_metrics(self, backend.compiled_user_metrics(self))
        return super().make_test_function(force)

    def make_private(self, sampler, **policy_args):
        """Validates the compiled model and sets its :class:`PrivacyPolicy` for ``sampler``.

        See ``PrivacyPolicy.plan`` for the arguments. Raises
        :class:`lipdp.errors.ModelNotSupportedError` naming any layer,
        loss or setting that has no certified bound. Switches TensorFloat-32
        off process-wide (on GPUs it rounds matmuls to ~1e-3, far above the
        bounds' margin).
        """
        self._validate_for_privacy()
        carried = model_releases(self)
        distribute.refuse_releases_across_workers(self, carried)
        releases = tuple(policy_args.pop("releases", ())) + carried
        policy = PrivacyPolicy.from_sampler(sampler, releases=releases, **policy_args)
        check_step_releases(self, policy)
        if self.steps_taken > 0:
            wanted = privacy_record(policy, self.mechanism)
            check_same_record(self._recorded(wanted), wanted, self.steps_taken)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        self.privacy = policy
        self.train_function = None  # the private step is traced anew with this policy's constants
        return policy

    def _recorded(self, wanted):
        """The record of the steps taken, as far as known: ``wanted`` or the saved policy's if its fingerprint is
        the one restored with the steps (loaded weights carry no policy), else ``None``."""
        restored = int(self.privacy_fingerprint.numpy())
        for candidate in [wanted] + ([] if self.privacy is None else [privacy_record(self.privacy, self.mechanism)]):
            if fingerprint(candidate) == restored:
                return candidate
        return None

    def _validate_for_privacy(self):
        if getattr(self, "optimizer", None) is None:
            raise NotPrivateError("compile the model (optimizer and a lipdp.losses loss) before make_private")
        backend.check_keras2([self.optimizer, self.loss], "compile argument")
        self.mechanism.validate(self)
        independence.check_examples_independent(self)
        if getattr(self, "jit_compile", False):
            raise ModelNotSupportedError(
                "jit_compile=True: XLA compiles away the runtime checks of the private step (the sampler gate that "
                "refuses steps outside fit(sampler), the finite-input check); compile without jit_compile"
            )
        distribute.check_strategy(distribute.strategy_of(self))
        if backend.steps_per_execution(self) != 1:
            raise ModelNotSupportedError("steps_per_execution must be 1: one noisy update per step")
        if self.losses:
            raise ModelNotSupportedError(
                "the model has regularization losses; lipdp does not add them to the private gradient"
            )

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
                " Keras' own batching is not what the accountant assumes"
            )
        self._check_sampler(x)
        self._validate_for_privacy()  # again: the model may have been recompiled since make_private
        if kwargs.get("batch_size") is not None or kwargs.get("validation_split"):
            raise ValueError("batch_size and validation_split are set by the sampler; pass validation_data instead")
        if steps_per_epoch not in (None, x.steps_per_epoch):
            raise ValueError(f"steps_per_epoch is fixed by the sampler ({x.steps_per_epoch})")
        callbacks = list(callbacks or [])
        if not any(isinstance(c, PrivacyLedger) for c in callbacks):
            callbacks.insert(0, PrivacyLedger())
        strategy = distribute.strategy_of(self)
        dataset = x.dataset() if strategy is None else x.distributed_dataset(strategy)
        self._sampler_gate.assign(True)
        try:
            return super().fit(dataset, epochs=epochs, steps_per_epoch=x.steps_per_epoch, callbacks=callbacks, **kwargs)
        finally:
            self._sampler_gate.assign(not self.accountable)
            self.reset_metrics()  # training metrics are private: keep them out of a saved model

    @property
    def steps_taken(self):
        """The private steps these weights took (global steps under a ``tf.distribute`` strategy), an int.

        The obvious way to read the count: ``int(model.privacy_steps)`` fails under a strategy (a distributed
        variable).
        """
        return int(self.privacy_steps.numpy())

    def steps_left(self):
        """Steps the calibrated plan still allows (``None`` when the noise was given, not calibrated)."""
        if self.privacy.planned_steps is None:
            return None
        return max(0, self.privacy.planned_steps - self.steps_taken)

    def check_sampling_alignment(self):
        """Refuses to start shuffled sampling in the middle of an accounted epoch.

        Each ``fit`` starts a new permutation. Shuffle accounting counts
        ``ceil(steps / steps_per_epoch)`` epochs, which only bounds the
        permutations really used when every ``fit`` starts at an epoch boundary.
        """
        steps, per_epoch = self.steps_taken, self.privacy.steps_per_epoch
        if steps % sampling.sampler_class(self.privacy.sampling).accounting_unit(per_epoch):
            raise ValueError(
                f"shuffled sampling cannot resume mid-epoch ({steps} steps, {per_epoch} per epoch): a new "
                "permutation would reuse examples the accountant counts once; use Poisson sampling to stop "
                "and resume anywhere"
            )

    # -- the private step ----------------------------------------------------
    @property
    def metrics(self):
        return [self._loss_tracker] + [m for m in super().metrics if m.name != "loss"]

    def noise_stddevs(self, sensitivity_):
        """Per-variable noise standard deviation on the gradient *sum* (float64).

        ``sensitivity_``: a :class:`lipdp.mechanisms.Sensitivity`, or a list
        of per-variable bounds.
        """
        if not isinstance(sensitivity_, mechanisms.Sensitivity):
            sensitivity_ = mechanisms.Sensitivity.of_variables(sensitivity_)
        return sensitivity_.noise_stddevs(
            self.privacy.gradient_noise_multiplier, self.privacy.noise_allocation, len(self.trainable_variables)
        )

    def noisy_gradients(self, gradient_sums, sensitivity_):
        """Adds noise calibrated to ``sensitivity_`` once, then divides by ``q N``.

        Under a ``tf.distribute`` strategy, ``gradient_sums`` is this
        replica's part of the sum, and only the first replica adds noise
        (:func:`lipdp.distribute.noise_mask`): the optimizer's all-reduce
        then holds one draw.
        """
        mask = distribute.noise_mask()
        stddevs = [std * mask for std in distribute.largest_over_replicas(self.noise_stddevs(sensitivity_))]
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
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("sample weights are not supported in DP training")
        gate = tf.debugging.Assert(
            self._sampler_gate,
            [
                "lipdp: a private step outside fit(sampler) is not accounted; use fit(sampler) or "
                "model.allow_unaccounted_steps()"
            ],
        )
        record = privacy_record(self.privacy, self.mechanism)
        expected = tf.constant(fingerprint(record), tf.int64)
        resumed_under_another_policy = tf.debugging.Assert(
            tf.logical_or(tf.equal(self.privacy_steps, 0), tf.equal(self.privacy_fingerprint, expected)),
            [
                "lipdp: these weights took",
                self.privacy_steps,
                "private steps (restored from a checkpoint or backup?) under another privacy policy or mechanism "
                "(privacy fingerprint",
                self.privacy_fingerprint,
                ") than the one make_private set (fingerprint",
                expected,
                f"): {record}; the accountant would count the earlier steps under the new policy. Resume with the "
                "settings that took them, or start from fresh weights (a new run folder)",
            ],
            summarize=-1,
        )
        releasing = step_release_layers(self)
        with tf.control_dependencies([gate, resumed_under_another_policy]):  # nothing runs before the checks pass
            with contextlib.ExitStack() as stack:  # other calls' statistics (held-out monitors) stay out
                for layer in releasing:
                    stack.enter_context(layer.gathering())
                y_pred, per_sample_loss, gradient_sums, sensitivity_ = self.private_gradient_sums(x, y)
            noisy = self.noisy_gradients(gradient_sums, sensitivity_)
            self.optimizer.apply_gradients(zip(noisy, self.trainable_variables))
            for layer in releasing:  # after the gradient, whose bound used the statistic's state in force
                layer.release(self.privacy.quantile_noise_multiplier, self.privacy.expected_batch_size, self._noise)
            self.privacy_steps.assign_add(1)
            self.privacy_fingerprint.assign(expected)
            return self._update_metrics(y, y_pred, per_sample_loss)

    def private_gradient_sums(self, x, y):
        """``(y_pred, per_sample_loss, gradient_sums, sensitivity)`` from the model's mechanism.

        Clipless (:class:`lipdp.sensitivity.CertifiedBounds`): the ordinary
        gradient of the summed per-sample losses and the certified
        per-variable bounds for the weights in use. Clipping: the clipped sum
        and the rule's sensitivity (:mod:`lipdp.clipping`).
        """
        if self.microbatch_size is None:
            result = self.mechanism.gradient_sums(self, x, y)
        else:
            result = mechanisms.microbatched_gradient_sums(self.mechanism, self, x, y, self.microbatch_size)
        return result.y_pred, result.per_sample_loss, result.sums, result.sensitivity

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        return self._update_metrics(y, y_pred, self.loss.call(y, y_pred))

    def _update_metrics(self, y, y_pred, per_sample_loss):
        self._loss_tracker.update_state(per_sample_loss)
        backend.update_compiled_metrics(self, y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    # -- reporting -----------------------------------------------------------
    def epsilon(self):
        """Epsilon spent so far (at the policy's delta)."""
        self._check_accountable()
        return self.privacy.epsilon(self.steps_taken)

    def privacy_state(self):
        """What ``privacy.json`` records."""
        self._check_accountable()
        check_releases_accounted(self, self.privacy)
        steps = self.steps_taken
        stated = privacy_record(self.privacy, self.mechanism)
        if steps and self._recorded(stated) is None:
            raise NotPrivateError(
                f"these weights took {steps} private steps under another privacy policy or mechanism than the "
                f"model states now ({stated}); a statement of them would be wrong: set back the policy and "
                "mechanism that took them"
            )
        return {
            "epsilon": self.privacy.epsilon(steps),
            "steps": steps,
            **self.privacy.to_dict(),
            "mechanism": self.mechanism.get_config(),
            "ledger": ledger.ledger_to_json(self.privacy.ledger(steps)),
        }

    def privacy_statement(self):
        """A one-paragraph, human-readable statement of the guarantee."""
        return statement(self.privacy_state(), self.mechanism.describe(), self.privacy)

    def get_config(self):
        privacy = None if self.privacy is None else self.privacy.to_dict()
        return {
            **super().get_config(),
            "privacy": privacy,
            "accountable": self.accountable,
            "mechanism": self.mechanism.get_config(),
            "microbatch_size": self.microbatch_size,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        privacy = config.pop("privacy", None)
        accountable = config.pop("accountable", True)
        mechanism = config.pop("mechanism", None)
        microbatch_size = config.pop("microbatch_size", None)
        model = super().from_config(config, custom_objects)
        model._set_privacy(privacy)
        model.microbatch_size = microbatch_size
        model.mechanism = mechanisms.get(mechanism)
        if not accountable:
            model.allow_unaccounted_steps()
        return model


@keras.utils.register_keras_serializable("lipdp")
class DPModel(DPModelMixin, keras.Model):
    """Functional ``keras.Model`` (DAGs, residual blocks) trained with DP.

    Takes the arguments of ``keras.Model`` and of :class:`DPSequential`
    (``privacy``, ``noise_seed``, ``mechanism``, ``microbatch_size``).
    """

    def __init__(self, inputs, outputs, name=None, trainable=True, **kwargs):
        # Functional's exact signature, so Keras saves and revives it as a graph.
        backend.check_keras2(tf.nest.flatten(outputs), "model output")
        privacy = {
            key: kwargs.pop(key) for key in ("privacy", "noise_seed", "mechanism", "microbatch_size") if key in kwargs
        }
        super().__init__(inputs, outputs, name=name, trainable=trainable, **kwargs)
        self._init_privacy(**privacy)


@keras.utils.register_keras_serializable("lipdp")
class DPSequential(DPModelMixin, keras.Sequential):
    """``keras.Sequential`` trained with DP.

    ``mechanism``: how a step gets its gradient sum and sensitivity, anything
    :func:`lipdp.mechanisms.get` takes. The default is clipless training with
    certified bounds (``"certified"``; ``{"name": "certified", "augmentation":
    ...}`` trains on augmented views, :mod:`lipdp.augmentation`); ``"flat"``,
    ``"automatic"`` or ``"global"`` (e.g. ``{"name": "flat", "clip_norm": 1.0}``)
    train any per-sample Keras network by per-example clipping
    (:mod:`lipdp.clipping`).
    """

    def __init__(self, layers=None, name=None, privacy=None, noise_seed=None, mechanism=None, microbatch_size=None):
        backend.check_keras2(layers or [], "layer")
        super().__init__(layers=layers, name=name)
        self._init_privacy(privacy, noise_seed, mechanism, microbatch_size=microbatch_size)
