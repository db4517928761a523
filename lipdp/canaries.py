"""Privacy auditing with one training run: canaries and the epsilon lower bound they prove.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). ``m`` canaries are each included in training independently
with probability 1/2 (``S_i`` uniform on {included, excluded}). After the run
an auditor, looking only at what the mechanism released, guesses the
membership of ``r`` canaries (here: the ``r/2`` highest scores "included",
the ``r/2`` lowest "excluded", ``r`` fixed before training) and gets ``v``
right. If the training is (epsilon, delta)-DP with respect to adding or
removing one canary, the paper's main theorem (approximate DP) bounds the
chance of ``v`` or more correct guesses::

    P[W >= v] <= B(v) + 2 m delta max_{i = 1..m} (B(v - i) - B(v)) / i,
    B(t) = P[Binomial(r, e^eps / (1 + e^eps)) >= t]

(the ``max`` may stop at ``i = v``: beyond it ``B(v - i) = 1`` and the ratio
only falls). That bound is a p-value for the claim "(eps, delta)-DP"
(:func:`p_value`); :func:`epsilon_lower_bound` returns the largest epsilon
the observed ``v`` rejects at confidence ``1 - beta``: the first epsilon,
scanning up from 0 (on a grid of 0.05, then bisected), where the p-value
exceeds ``beta``. So the claim that the
run is (eps_true, delta)-DP is wrongly rejected -- the lower bound exceeds
eps_true -- with probability at most ``beta``, whether or not the p-value is
monotone in epsilon.

What a lower bound proves, and what it does not:

* A lower bound above the claimed epsilon (``exceeds_claim``) is evidence,
  at confidence ``1 - beta``, that the run is **not** (claimed eps, delta)-DP:
  a bug in the bounds, the noise or the accounting.
* A lower bound below the claim proves nothing about privacy: it is a lower
  bound, not a proof. The one-run test is weak for small ``m``: even with
  every guess right it cannot exceed a ceiling of about ``log(r)``
  (``epsilon_ceiling`` in the result; less with ``delta > 0``), and it stays
  well below the claim for a correct mechanism, since one run does not see
  the worst case the accountant covers. Only gross bugs are caught: measured
  on digits, a model adding a tenth of its noise at a claim of 1 shows 3.4,
  but one adding half its noise stays under its claim (1.1 at a claim of 2).
* The canaries are inserted, so the audited run is not the user's run: its
  weights are discarded, and the user's model is not audited -- the
  *mechanism* (config, bounds, noise, accounting) is.

Two kinds of canaries:

* ``gradient`` (white box, :class:`CanaryStep`): canary ``i`` owns one
  parameter coordinate (a "Dirac" canary; ``m`` at most the number of
  parameters). Each step, an included canary is drawn with the sampler's
  Poisson rate ``q`` (independently of the batch), and when drawn adds to
  the gradient sum, before the noise, a vector along its coordinate whose
  norm is the step's declared sensitivity: ``Sensitivity.total`` (for
  ``"per-layer"`` noise allocation the variable's own bound, the most a
  per-variable bound allows in one variable). Its score is the released noisy
  gradient sum read on its coordinate, less the expected data gradient, in
  units of its own norm, summed over the steps (about the number of times it
  was drawn, plus noise). The coordinates are those that held-out data move
  least. This audits the noise and the accounting against the *declared*
  sensitivity, and only that: a mechanism that under-reports its sensitivity
  shrinks the canaries with its noise, so it is **not** caught here (the
  bound checks of :mod:`lipdp.sensitivity` and the report's tightness
  section compare real gradient norms with the bounds).
* ``input`` (black box, :func:`input_audit`): held-out test examples with a
  wrong label, included ones appended to the training set; scored by minus
  their loss under the trained model. This audits the whole pipeline end to
  end, bounds included, but a natural example's gradient is far below the
  worst case, so its lower bound is small at realistic budgets.

Assumptions: each canary's inclusion is an independent fair coin drawn from
the audit's own seed, and never depends on the data; the guesses depend only
on the released gradients (gradient canaries) or the final model (input
canaries); ``r`` is fixed before training (trying several ``r`` and keeping
the best would need a multiple-testing correction). The claimed epsilon is
the model's own (dp-accounting, through its :class:`PrivacyPolicy`).
Gradient canaries need Poisson sampling, one replica and a DPSequential model.
"""

import os

import numpy as np
import tensorflow as tf

from lipdp import runs
from lipdp.backend import keras
from lipdp.errors import ConfigError, ModelNotSupportedError, PrivacyParameterError
from lipdp.model import DPSequential
from lipdp.one_run_test import default_guesses, draw_inclusion, summarise

KINDS = ("gradient", "input")
RESULT = runs.CANARY_AUDIT


# -- gradient canaries ------------------------------------------------------------------
class GradientCanaries:
    """Dirac canaries on distinct flat parameter ``coordinates`` of ``variables`` (see the module docstring)."""

    def __init__(self, variables, included, coordinates, seed):
        sizes = [int(np.prod(v.shape)) for v in variables]
        rng = np.random.default_rng(seed)
        owner = np.searchsorted(np.cumsum(sizes), coordinates, side="right")
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        self.included = np.asarray(included, bool)
        self.shapes = [v.shape for v in variables]
        self.ids = [np.flatnonzero(owner == b) for b in range(len(variables))]
        self.coordinates = [(coordinates[ids] - offsets[b])[:, None] for b, ids in enumerate(self.ids)]
        self.scores = tf.Variable(tf.zeros(len(included), tf.float64), trainable=False)
        self.draws = tf.random.Generator.from_seed(int(rng.integers(2**31)))

    def norms(self, sensitivity, allocation):
        """Each variable's canary norm: the declared total, or the variable's own bound under per-layer noise."""
        if sensitivity.per_variable is not None and allocation == "per-layer":
            return list(sensitivity.per_variable)
        return [sensitivity.total] * len(self.shapes)

    def insert(self, sums, norms, rate):
        """``sums`` plus every included canary that this step's Poisson draw (rate ``rate``) picks."""
        drawn = tf.logical_and(self.draws.uniform([len(self.included)]) < rate, self.included)
        result = []
        for total, ids, coordinates, shape, norm in zip(sums, self.ids, self.coordinates, self.shapes, norms):
            total = tf.convert_to_tensor(total)
            values = tf.cast(tf.gather(drawn, ids), total.dtype) * tf.cast(norm, total.dtype)
            added = tf.scatter_nd(coordinates, values, [int(np.prod(shape))])
            result.append(total + tf.reshape(added, shape))
        return result

    def record(self, noisy_sums, norms):
        """Adds each canary's coordinate of the released noisy sums, in units of its norm, to its score."""
        for noisy, ids, coordinates, norm in zip(noisy_sums, self.ids, self.coordinates, norms):
            read = tf.gather_nd(tf.reshape(tf.cast(noisy, tf.float64), [-1]), coordinates)
            self.scores.scatter_nd_add(ids[:, None], read / tf.cast(norm, tf.float64))


class CanaryStep:
    """Mixed into a :class:`DPSequential` class: its private step carries gradient canaries (audit runs only).

    The one hook is :meth:`noisy_gradients`: the canaries join the gradient
    sums before the inherited noise, and the released noisy sums are read
    back for their scores, less the expected data gradient (the gradient sum
    of held-out reference examples at the same weights, scaled to the
    expected batch size) so that a coordinate's own data gradient does not
    drown its canary. Everything else is the parent's step.
    """

    def attach_canaries(self, canaries, x_reference, y_reference):
        object.__setattr__(self, "canaries", canaries)
        object.__setattr__(self, "_reference", (tf.constant(x_reference), tf.constant(y_reference)))
        return self

    def noisy_gradients(self, gradient_sums, sensitivity_):
        norms = self.canaries.norms(sensitivity_, self.privacy.noise_allocation)
        with_canaries = self.canaries.insert(gradient_sums, norms, self.privacy.sampling_rate)
        noisy = super().noisy_gradients(with_canaries, sensitivity_)
        scale = self.privacy.expected_batch_size
        released = [g * scale for g in noisy]
        expected = [g * (scale / len(self._reference[0])) for g in self._reference_gradient_sums()]
        self.canaries.record([g - e for g, e in zip(released, expected)], norms)
        return noisy

    def _reference_gradient_sums(self):
        x, y = self._reference
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(self.loss.call(y, self(x, training=True)))
        return tape.gradient(loss, self.trainable_variables)


def with_gradient_canaries(model, included, x_reference, y_reference, seed=None):
    """A copy of ``model`` (its class with :class:`CanaryStep` mixed in, its layers and mechanism, compiled like
    it) that carries the canaries; the model's own step (noise included) is what is audited.

    ``(x_reference, y_reference)``: held-out examples (never the training
    set), whose gradient estimates the data's part of each released sum.
    """
    if not isinstance(model, DPSequential) or isinstance(model, CanaryStep):
        raise ModelNotSupportedError("gradient canaries need a lipdp.DPSequential model")
    audited_class = type(f"Canary{type(model).__name__}", (CanaryStep, type(model)), {})
    audited = audited_class(
        [model.inputs[0]] + model.layers, mechanism=model.mechanism, microbatch_size=model.microbatch_size
    )
    audited.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    coordinates = quiet_coordinates(audited, x_reference, y_reference, len(included))
    canaries = GradientCanaries(audited.trainable_variables, included, coordinates, seed)
    return audited.attach_canaries(canaries, x_reference, y_reference)


def quiet_coordinates(model, x_reference, y_reference, count, chunk=8):
    """The ``count`` flat parameter coordinates where held-out examples move the gradient least (initial weights).

    A canary on a coordinate that the data's gradient moves a lot is lost in
    the batch-to-batch fluctuation of that gradient; the mean square of the
    gradient sums of small chunks of reference examples ranks the coordinates
    (public data only, so the choice is independent of the canaries' coins).
    """
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    if count > total:
        raise ModelNotSupportedError(f"{count} gradient canaries need as many parameters; the model has {total}")
    loudness = np.zeros(total)
    for start in range(0, len(x_reference), chunk):
        x, y = x_reference[start : start + chunk], y_reference[start : start + chunk]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model.loss.call(tf.constant(y), model(x, training=True)))
        gradients = tape.gradient(loss, model.trainable_variables)
        loudness += np.concatenate([np.ravel(g) for g in gradients]) ** 2
    return np.argsort(loudness, kind="stable")[:count]


def gradient_audit(
    model, sampler, reference, epochs, canaries, guesses=None, seed=None, confidence=0.95, verbose=0, **policy
):
    """Trains a copy of the compiled ``model`` with ``canaries`` gradient canaries; returns :func:`summarise`'s dict.

    ``reference``: ``(x, y)`` held-out examples (see :func:`with_gradient_canaries`).
    ``policy``: ``make_private``'s arguments (``target_epsilon`` or
    ``noise_multiplier``, ``delta``, ...). ``seed`` seeds the canaries (their
    coins, coordinates and draws), never the training noise.
    """
    if sampler.kind != "poisson":
        raise PrivacyParameterError("gradient canaries are drawn like Poisson-sampled examples: use Poisson sampling")
    rng = np.random.default_rng(seed)
    included = draw_inclusion(canaries, rng)
    audited = with_gradient_canaries(model, included, *reference, seed=rng.integers(2**31))
    audited.make_private(sampler, **_calibration(policy, epochs))
    audited.fit(sampler, epochs=epochs, verbose=verbose)
    scores = audited.canaries.scores.numpy()
    guesses = default_guesses(canaries) if guesses is None else guesses
    return summarise(
        "gradient",
        scores,
        included,
        guesses,
        audited.epsilon(),
        audited.privacy.delta,
        confidence,
        steps=audited.steps_taken,
    )


def _calibration(policy, epochs):
    """``make_private``'s arguments: ``epochs`` joins them when the noise is calibrated to a target epsilon."""
    return {**policy, "epochs": epochs} if policy.get("target_epsilon") is not None else dict(policy)


# -- input canaries ---------------------------------------------------------------------
def mislabelled(x, y, canaries, rng):
    """``canaries`` examples drawn from ``(x, y)`` (one-hot), each given a uniformly drawn wrong label."""
    picks = rng.choice(len(x), canaries, replace=canaries > len(x))
    classes = y.shape[-1]
    labels = (np.argmax(y[picks], axis=-1) + rng.integers(1, classes, canaries)) % classes
    return x[picks], np.eye(classes, dtype=y.dtype)[labels]


def input_audit(
    build_model,
    x_train,
    y_train,
    canary_x,
    canary_y,
    *,
    sampler_kind,
    batch_size,
    epochs,
    guesses=None,
    seed=None,
    confidence=0.95,
    verbose=0,
    **policy,
):
    """Trains ``build_model(sampler)`` on the data plus the included input canaries; returns :func:`summarise`'s dict.

    ``build_model``: a compiled DP model for the sampler (fresh weights); ``policy``: as :func:`gradient_audit`'s.
    """
    from lipdp import audit, sampling

    rng = np.random.default_rng(seed)
    included = draw_inclusion(len(canary_x), rng)
    x = np.concatenate([x_train, canary_x[included]])
    y = np.concatenate([y_train, canary_y[included]])
    sampler = sampling.make_sampler(sampler_kind, x, y, batch_size=batch_size)
    model = build_model(sampler)
    model.make_private(sampler, **_calibration(policy, epochs))
    model.fit(sampler, epochs=epochs, verbose=verbose)
    _, loss, _ = audit.model_outputs(model, canary_x, canary_y)
    guesses = default_guesses(len(canary_x)) if guesses is None else guesses
    return summarise(
        "input", -loss, included, guesses, model.epsilon(), model.privacy.delta, confidence, steps=model.steps_taken
    )


# -- a config's audit ---------------------------------------------------------------------
def audit_config(cfg, out_dir, canaries, kind="gradient", guesses=None, seed=None, confidence=0.95, verbose=0):
    """Audits ``cfg``'s training with canaries; writes :data:`RESULT` into ``out_dir`` and returns it.

    The canary run trains its own weights (never saved): ``out_dir`` may hold
    the completed ``lipdp train`` run of the same config, whose report then
    shows the audit, or be a new folder.
    """
    from lipdp import data, training

    _check_auditable(cfg, out_dir, kind)
    keras.utils.set_random_seed(cfg.training.seed)
    dataset = data.configured_split(data.load(cfg.dataset.name, data_dir=cfg.dataset.data_dir), cfg.dataset)
    policy = training.policy_arguments(cfg, ())
    epochs = cfg.training.epochs
    del policy["epochs"]
    sampling_seed = cfg.sampling.seed

    def build(sampler):
        return training.build_model(
            cfg, dataset.input_shape, training_steps=cfg.training.epochs * sampler.steps_per_epoch
        )

    if kind == "gradient":
        from lipdp import sampling

        sampler = sampling.make_sampler(
            cfg.sampling.kind, dataset.x_train, dataset.y_train, batch_size=cfg.sampling.batch_size, seed=sampling_seed
        )
        reference = (dataset.x_test, dataset.y_test)
        result = gradient_audit(
            build(sampler), sampler, reference, epochs, canaries, guesses, seed, confidence, verbose, **policy
        )
    else:
        canary_x, canary_y = mislabelled(dataset.x_test, dataset.y_test, canaries, np.random.default_rng(seed))
        result = input_audit(
            build,
            dataset.x_train,
            dataset.y_train,
            canary_x,
            canary_y,
            sampler_kind=cfg.sampling.kind,
            batch_size=cfg.sampling.batch_size,
            epochs=epochs,
            guesses=guesses,
            seed=seed,
            confidence=confidence,
            verbose=verbose,
            **policy,
        )
    result["data"] = dataset.source
    result["config"] = cfg.to_dict()
    os.makedirs(out_dir, exist_ok=True)
    runs.write_json(out_dir, RESULT, result)
    return result


def _check_auditable(cfg, out_dir, kind):
    """Refuses what the canary run does not reproduce, and a run folder of another config."""
    if kind not in KINDS:
        raise ConfigError(f"canary kind {kind!r} is not one of {KINDS}")
    unsupported = {
        "model.frontend": cfg.model.frontend,
        "model.feature_statistics": cfg.model.feature_statistics,
    }
    unsupported["training.strategy"] = None if cfg.training.strategy == "none" else cfg.training.strategy
    named = [key for key, value in unsupported.items() if value is not None]
    if named:
        raise ConfigError(f"the canary audit does not support {', '.join(named)} yet; audit a config without them")
    if runs.is_complete(out_dir):
        from lipdp import config

        recorded = config.load(runs.path(out_dir, runs.CONFIG)).to_dict()
        wanted = cfg.to_dict()
        for settings in (recorded, wanted):
            settings["dataset"].pop("data_dir", None)
        if recorded != wanted:
            raise ConfigError(
                f"{out_dir} holds a run of another config: its report would show an audit of settings it was not "
                "trained with; use the run's config.yaml, or another --out"
            )
