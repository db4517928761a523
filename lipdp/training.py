"""A training run from a config: data, model, sampler, privacy, fit, artefacts.

``run(config, out_dir)`` writes the run folder whose format :mod:`lipdp.runs`
owns (config, history, model, sensitivity report, privacy state, metrics).
An interrupted run resumes from its backup when started again with the same
command; a completed run is never overwritten.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
import yaml

from lipdp import callbacks, data, distribute, losses, records, robustness, runs, sampling, sensitivity, statistics
from lipdp import config as config_lib
from lipdp.backend import keras
from lipdp.errors import PrivacyBudgetExhausted
from lipdp.layers import ChannelStandardization, InputNormClip, cached_features
from lipdp.layers.frontends import array_fingerprint
from lipdp.model import DPSequential
from lipdp.policy import PrivacyPolicy

#: Held-out examples per batch of the per-epoch validation (read from the features as they are needed).
VALIDATION_BATCH_SIZE = 1024


def build_layers(cfg: config_lib.Config, input_shape, frontends=()):
    """Fresh layers for ``cfg.model``: an input, the ``frontends``, an :class:`InputNormClip`, the configured layers."""
    layers = [keras.Input(input_shape), *frontends, InputNormClip(cfg.model.input_norm)]
    for spec in cfg.model.layers:
        arguments = {k: v for k, v in spec.items() if k != "type"}
        layers.append(config_lib.layer_class(spec["type"])(**arguments))
    return layers


def build_frontend(cfg: config_lib.Config):
    """The configured front-end layer (``model.frontend``), or ``None``."""
    return None if cfg.model.frontend is None else config_lib.frontend_layer(cfg.model.frontend)


def with_frontend(head, frontends, input_shape):
    """The model that takes raw inputs: the ``frontends`` then the trained ``head``'s layers (shared weights).

    Training on cached front-end features is the same mechanism as training
    this model on raw inputs (each front-end is a fixed per-example map), so
    the head's privacy policy and step count carry over unchanged.
    """
    model = DPSequential(
        [keras.Input(input_shape), *frontends] + head.layers,
        mechanism=head.mechanism,
        microbatch_size=head.microbatch_size,
    )
    model.compile(optimizer=head.optimizer, loss=head.loss, metrics=["accuracy"])
    model.privacy = head.privacy
    model.privacy_steps.assign(head.privacy_steps)
    model.privacy_fingerprint.assign(head.privacy_fingerprint)
    if not head.accountable:
        model.allow_unaccounted_steps()
    return model


def _ema(cfg):
    """Keras' weight averaging (``use_ema``): the averaged weights replace the trained ones when fit ends."""
    momentum = cfg.optimizer.ema_momentum
    if momentum is None:
        return {}
    if not 0.0 < momentum < 1.0:
        raise config_lib.ConfigError(f"optimizer.ema_momentum: must be in (0, 1), got {momentum!r}")
    return {"use_ema": True, "ema_momentum": float(momentum)}


def build_model(cfg: config_lib.Config, input_shape, training_steps=None, frontends=()):
    """The compiled DP model described by ``cfg``, on inputs of ``input_shape`` (features, with a front-end).

    ``training_steps``: the steps the run plans, for a decaying learning rate. ``frontends``: front-end layers
    to apply before the input clip (a released :class:`ChannelStandardization`).
    """
    layers = build_layers(cfg, input_shape, frontends)
    model = DPSequential(
        layers,
        mechanism=config_lib.build_mechanism(cfg.model.mechanism),
        microbatch_size=cfg.training.microbatch_size,
    )  # the noise generator is seeded from OS entropy, never from the config
    loss_cls = getattr(losses, cfg.loss.type, None)
    if loss_cls is None or not isinstance(loss_cls, type) or not issubclass(loss_cls, losses.LipschitzLoss):
        raise config_lib.ConfigError(f"loss.type: {cfg.loss.type!r} is not a lipdp.losses loss")
    model.compile(
        optimizer=build_optimizer(cfg, training_steps),
        loss=loss_cls(**cfg.loss.params),
        metrics=["accuracy", *_certified_accuracy_metrics(cfg, model)],
    )
    return model


def _certified_accuracy_metrics(cfg, model):
    """``CertifiedAccuracy`` at the configured radii, when the model takes raw inputs and can be certified.

    A head trained on front-end features would certify radii in feature
    units; those runs get the certified accuracy of the whole model (raw
    inputs) in ``metrics.json`` only.
    """
    if cfg.model.frontend is not None or cfg.model.feature_statistics is not None:
        return []
    if not robustness.certify(model).certified:
        return []
    return [robustness.CertifiedAccuracy(radius) for radius in config_lib.certified_radii(cfg)]


def build_optimizer(cfg, training_steps=None):
    """The Keras optimizer of ``cfg.optimizer``; a decaying learning rate needs the planned ``training_steps``.

    The optimizer sees the noisy gradient only: its state, momentum, decay and
    weight averaging are post-processing of the private releases.
    """
    settings = cfg.optimizer
    learning_rate = settings.learning_rate
    if settings.decay == "cosine":
        if not training_steps:
            raise ValueError("optimizer.decay=cosine needs the number of training steps the run plans")
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=int(training_steps))
    return keras.optimizers.get(
        {  # not the legacy optimizer: model.keras drops a legacy one's state
            "class_name": settings.name,
            "config": {"learning_rate": learning_rate, "is_legacy_optimizer": False, **settings.params, **_ema(cfg)},
        }
    )


def run(cfg: config_lib.Config, out_dir, verbose=1):
    """Trains as configured and writes the artefacts; returns the model and ``metrics.json``'s content.

    With ``training.strategy`` (:mod:`lipdp.distribute`), the model is built
    under that strategy. Under ``multi_worker`` every worker runs the same
    command: the chief writes the run folder, the other workers take part in
    every step, checkpoint and save, writing into a temporary folder that is
    removed at the end (Keras' multi-worker rule), and read the chief's backup
    when a run resumes.
    """
    strategy = distribute.make_strategy(cfg.training.strategy, cfg.training.logical_cpus)
    if distribute.is_chief(strategy):
        return _run(cfg, out_dir, out_dir, strategy, verbose)
    work_dir = tempfile.mkdtemp(prefix="lipdp-worker-")
    try:
        return _run(cfg, out_dir, work_dir, strategy, verbose=0)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# what a resumed run may change: its length (not under a decaying learning rate), its budget, its evaluation, where
# its data and cache are read, and the memory a step takes
RESUMABLE_CHANGES = (
    "training.epochs",
    "privacy.epsilon_budget",
    "evaluation",
    "dataset.data_dir",
    "dataset.feature_cache",
    "training.microbatch_size",
)


def _run(cfg, out_dir, work_dir, strategy, verbose):
    """:func:`run` in ``work_dir`` (``out_dir`` on the chief), with the backup shared in ``out_dir``."""
    runs.start(work_dir)
    runs.check_resumable(work_dir, seeded=cfg.sampling.seed is not None)
    keras.utils.set_random_seed(cfg.training.seed)
    full = data.load(cfg.dataset.name, data_dir=cfg.dataset.data_dir)
    raw, frontend = data.configured_split(full, cfg.dataset), build_frontend(cfg)
    sampling.check_data(raw.x_train, raw.y_train)  # before any release or step
    dataset, frontends, head_frontends = raw, [], []
    if frontend is not None:  # features of the whole data set (one cache entry for every split of it), memory-mapped
        dataset = data.configured_split(_features(full, frontend, cfg.dataset.feature_cache, verbose), cfg.dataset)
        frontends.append(frontend)
    raw_record, raw_shape, held_out = _data_record(raw), raw.input_shape, (raw.x_test, raw.y_test, _data_summary(raw))
    del full, raw  # with a front-end the raw training images are read no more: freed (0.55 GB for CIFAR-10)
    _check_resume_releases(cfg, work_dir)
    if cfg.model.feature_statistics is not None or os.path.exists(runs.path(work_dir, runs.STATISTICS)):
        # the head's first layer: each batch is standardised as it is drawn (the features are never copied
        # whole), and make_private composes the release the layer carries
        head_frontends.append(_released_standardization(cfg, dataset.x_train, work_dir))

    seed = cfg.sampling.seed
    if seed is not None:
        warnings.warn(
            "sampling.seed is set: the batches are reproducible, and the privacy amplification by "
            "subsampling holds only while the seed stays secret (do not publish config.yaml)"
        )
    sampler = sampling.make_sampler(
        cfg.sampling.kind,
        dataset.x_train,
        dataset.y_train,
        batch_size=cfg.sampling.batch_size,
        seed=None if seed is None else [seed, runs.next_attempt(work_dir)],
    )
    with distribute.scope(strategy):
        steps = cfg.training.epochs * sampler.steps_per_epoch
        model = build_model(cfg, dataset.input_shape, training_steps=steps, frontends=head_frontends)
    model.make_private(sampler, **policy_arguments(cfg, releases=()))  # the releases: the head's layers carry them
    policy_record = _check_resume_record(model, raw_record, work_dir)
    _check_resume_config(cfg, out_dir)
    write_records = functools.partial(_write_records, model, cfg, policy_record, work_dir)
    extra = [
        callbacks.PrivacyLedger(),
        callbacks.GradientNoiseMonitor(dataset.x_test, dataset.y_test),  # held-out data only
        # kept after fit until the artefacts are written: a crash while assembling or saving the model resumes
        # from the trained weights (no epoch left to run) instead of losing them
        keras.callbacks.BackupAndRestore(runs.path(out_dir, runs.BACKUP), delete_checkpoint=False),
        keras.callbacks.CSVLogger(runs.path(work_dir, runs.HISTORY), append=True),
    ]
    budget = None if cfg.privacy.epsilon_budget is None else callbacks.BudgetStop(cfg.privacy.epsilon_budget)
    if budget is not None:
        extra.append(budget)
    extra.append(keras.callbacks.LambdaCallback(on_train_begin=lambda logs: write_records()))  # the last callback
    if verbose:
        print(f"data: {dataset.source}")
        print(f"privacy policy: {model.privacy}")
        if strategy is not None:
            print(f"strategy: {type(strategy).__name__}, {strategy.num_replicas_in_sync} replicas")
    # built now, not at the first step: a backup restores its state (averaged weights included) even when
    # the resumed run has no step left (Keras 2.15's BackupAndRestore does not build it)
    with distribute.scope(strategy):
        model.optimizer.build(model.trainable_variables)
    try:
        model.fit(
            sampler,
            epochs=cfg.training.epochs,
            validation_data=sampling.array_dataset(dataset.x_test, dataset.y_test, VALIDATION_BATCH_SIZE),
            callbacks=extra,
            verbose=verbose,
        )
    except PrivacyBudgetExhausted:
        if budget is None or not 0 < model.steps_taken == budget.max_steps:
            raise
        # resumed after its budget had ended training (then a crash while saving): what fit's end does, no step
        model.optimizer.finalize_variable_values(model.trainable_variables)
        write_records()
    _check_trained_epochs(model, cfg, sampler.steps_per_epoch)
    if frontends:
        with distribute.scope(strategy):
            model = with_frontend(model, frontends, raw_shape)
    model, metrics = _write_artefacts(model, *held_out, work_dir, config_lib.certified_radii(cfg))
    if work_dir == out_dir:  # the chief owns the shared backup folder
        runs.remove_backup(out_dir)
    return model, metrics


def _write_records(model, cfg, policy_record, run_dir):
    """Writes ``policy.json`` and ``config.yaml`` once every check passed, the backup's restore and its steps'
    record included (fit's ``on_train_begin``): a refused start leaves the run folder's records as they were."""
    if model.steps_taken:
        model.privacy_state()  # refuses restored steps that another policy or mechanism took
    runs.write_json(run_dir, runs.POLICY, policy_record)
    runs.write_text(run_dir, runs.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check_resume_releases(cfg, run_dir):
    """Before anything is released: a resumed run's steps were taken after the releases ``policy.json`` names,
    whose values ``feature_statistics.json`` holds (a run with a backup took steps, after its releases)."""
    wanted = list(configured_releases(cfg))
    if os.path.exists(runs.path(run_dir, runs.POLICY)):
        recorded = runs.read_json(run_dir, runs.POLICY)["policy"]["release_noise_multipliers"]
        if recorded != wanted:
            raise config_lib.ConfigError(
                f"{run_dir} holds an interrupted run whose steps were taken after the releases {recorded}, but the "
                f"config asks for {wanted} (model.feature_statistics); resume with the config of the first start, "
                "or start afresh in a new run folder (--out)"
            )
    elif not os.path.exists(runs.path(run_dir, runs.BACKUP)):
        return  # a first start, or one that took no step
    if wanted and not os.path.exists(runs.path(run_dir, runs.STATISTICS)):
        raise config_lib.ConfigError(
            f"{run_dir} holds an interrupted run whose steps were taken after a release of the training data's "
            f"statistics, but its {runs.STATISTICS} is missing: another release would make two where the accountant "
            "counts one. Start afresh in a new run folder (--out)"
        )


def _check_resume_config(cfg, run_dir):
    """A resumed run (its backup exists) goes on under its first config; only :data:`RESUMABLE_CHANGES` may differ.

    The privacy-relevant changes are refused before, naming the privacy
    setting; this catches the rest (the layers, the optimizer, the loss...),
    which would otherwise fail in Keras' restore or silently train another
    model than the one the run folder's config describes.
    """
    recorded = runs.path(run_dir, runs.CONFIG)
    if not (os.path.exists(runs.path(run_dir, runs.BACKUP)) and os.path.exists(recorded)):
        return
    changes = records.record_changes(config_lib.load(recorded).to_dict(), cfg.to_dict())
    allowed = _resumable_changes(cfg)
    changes = [change for change in changes if not _is_resumable(change.split(":")[0], allowed)]
    if changes:
        raise config_lib.ConfigError(
            f"{run_dir} holds an interrupted run started under another config. Changed: "
            + "; ".join(changes)
            + f". A resume may change only {', '.join(allowed)}: resume with the config of the first "
            "start, or start afresh in a new run folder (--out)"
        )


def _resumable_changes(cfg):
    """:data:`RESUMABLE_CHANGES`, less ``training.epochs`` when the learning rate decays over the planned steps."""
    if cfg.optimizer.decay is None:
        return RESUMABLE_CHANGES
    return tuple(key for key in RESUMABLE_CHANGES if key != "training.epochs")


def _is_resumable(key, allowed):
    return any(key == prefix or key.startswith(prefix + ".") for prefix in allowed)


def _check_trained_epochs(model, cfg, steps_per_epoch):
    """A resume asking fewer epochs than its backup trained would save a model its ``config.yaml`` does not describe."""
    if model.steps_taken > cfg.training.epochs * steps_per_epoch:
        raise config_lib.ConfigError(
            f"training.epochs: the interrupted run already took {model.steps_taken} steps, more than "
            f"{cfg.training.epochs} epochs of {steps_per_epoch}; resume with training.epochs of at least "
            f"{math.ceil(model.steps_taken / steps_per_epoch)}"
        )


def configured_releases(cfg):
    """The noise multipliers of what a run of ``cfg`` releases before training (``model.feature_statistics``)."""
    spec = cfg.model.feature_statistics
    return () if spec is None else (float(spec["noise_multiplier"]),)


def _data_record(dataset):
    """The fingerprint of ``dataset``'s training examples (raw inputs and labels) that ``policy.json`` records."""
    labels = hashlib.sha256(np.ascontiguousarray(dataset.y_train).tobytes())
    return array_fingerprint(dataset.x_train, labels)


def _data_summary(dataset):
    """What ``metrics.json`` records of the data: its split sizes and provenance."""
    return {"train_size": int(len(dataset.x_train)), "test_size": int(len(dataset.x_test)), "data": dataset.source}


def _check_resume_record(model, data_record, run_dir):
    """What the run's steps are taken under (policy, mechanism, data), for ``policy.json``; a resume must match.

    A resumed run restores the steps of its backup: the accountant counts them
    under today's policy, so any privacy-relevant change since (noise or
    target, delta, sampling, epochs when they set the calibration, the
    mechanism, the training data) is refused, naming what changed.
    """
    wanted = json.loads(records.privacy_record(model.privacy, model.mechanism))
    wanted["data"] = data_record
    if not os.path.exists(runs.path(run_dir, runs.POLICY)):
        return wanted
    changes = records.record_changes(runs.read_json(run_dir, runs.POLICY), wanted)
    if changes:
        raise config_lib.ConfigError(
            f"{run_dir} holds an interrupted run whose steps were taken under other privacy settings; resuming "
            "would account them under the new ones. Changed: " + "; ".join(changes) + ". Resume with the "
            "config and data of the first start, or start afresh in a new run folder (--out)"
        )
    return wanted


def _released_standardization(cfg, x_train, run_dir):
    """The run's :class:`ChannelStandardization`: released once from the training split, then read back.

    The budget is checked before anything is drawn. The release and what it
    was drawn with (settings, training set size and fingerprint) are written
    to the run folder before any step; a resumed run reuses the release only
    if the config asks for the same one, so the accountant counts exactly the
    release that happened, never a second draw.
    """
    spec = cfg.model.feature_statistics
    record_path = runs.path(run_dir, runs.STATISTICS)
    wanted = None
    if spec is not None:
        wanted = {"noise_multiplier": float(spec["noise_multiplier"]), "clip_norm": float(spec["clip_norm"])}
        wanted.update(scale=bool(spec.get("scale", False)), examples=len(x_train))
        wanted.update({key: float(spec[key]) for key in config_lib.STATISTICS_CLIPS if spec.get(key) is not None})
        wanted["data"] = array_fingerprint(x_train)
    if os.path.exists(record_path):
        record = runs.read_json(run_dir, runs.STATISTICS)
        drawn = record.get("release") or {}
        if drawn.get("noise_multiplier") != record["layer"].get("noise_multiplier"):  # the layer tells the accountant
            raise config_lib.ConfigError(
                f"model.feature_statistics: {record_path} is inconsistent: its layer carries noise multiplier "
                f"{record['layer'].get('noise_multiplier')!r}, its release was drawn with "
                f"{drawn.get('noise_multiplier')!r}; the file was edited or damaged. Start a new run folder (--out)"
            )
        if record["release"] != wanted:
            raise config_lib.ConfigError(
                f"model.feature_statistics: {record_path} holds a release made with {record['release']}, but this "
                f"run asks for {wanted}; the accountant would not count the release that happened. Resume with "
                "the same config and data, or start a new run folder (--out)"
            )
        return ChannelStandardization.from_config(record["layer"])
    _check_budget_before_release(cfg, len(x_train), wanted["noise_multiplier"])
    arguments = {
        key: wanted.get(key) for key in ("noise_multiplier", "clip_norm", "scale", *config_lib.STATISTICS_CLIPS)
    }
    layer = statistics.release_channel_statistics(x_train, **arguments)
    runs.write_json(run_dir, runs.STATISTICS, {"release": wanted, "layer": layer.get_config()})
    return layer


def _check_budget_before_release(cfg, dataset_size, release):
    """Calibrates the run's policy with the release included: an impossible budget fails before any draw."""
    planned_policy(cfg, dataset_size, (release,))


def planned_policy(cfg, dataset_size, releases=()):
    """The :class:`PrivacyPolicy` a run of ``cfg`` on ``dataset_size`` training examples takes its steps under.

    Computed from the config and the size alone (no data): what a run will
    spend is known before it starts.
    """
    schedule = sampling.sampler_class(cfg.sampling.kind).schedule(dataset_size, cfg.sampling.batch_size)
    return PrivacyPolicy.plan(**schedule, **policy_arguments(cfg, releases))


def policy_arguments(cfg, releases):
    """``PrivacyPolicy.from_sampler``'s arguments from ``cfg.privacy``, with the statistics ``releases``."""
    privacy = cfg.privacy
    return dict(
        noise_multiplier=privacy.noise_multiplier,
        target_epsilon=privacy.target_epsilon,
        epochs=cfg.training.epochs if privacy.target_epsilon is not None else None,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_allocation=privacy.noise_allocation,
        quantile_noise_share=privacy.quantile_noise_share,
        releases=releases,
    )


def _features(dataset, frontend, cache_dir, verbose):
    """The data set with the front-end's features as inputs (computed once, cached by data and settings)."""
    if verbose:
        print(
            f"front-end {type(frontend).__name__}: features of {len(dataset.x_train) + len(dataset.x_test)} examples"
            f"{'' if cache_dir is None else f' (cache: {cache_dir})'}"
        )
    cache_dir = None if cache_dir is None else os.path.expanduser(cache_dir)
    train, test = (cached_features(frontend, x, cache_dir, verbose=verbose) for x in (dataset.x_train, dataset.x_test))
    return dataclasses.replace(dataset, x_train=train, x_test=test)


def _write_artefacts(model, x_test, y_test, data_summary, out_dir, certified_radii):
    privacy = model.privacy_state()  # first: a model whose steps its policy cannot account leaves no artefact
    results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    metrics = {
        "test_loss": float(results["loss"]),
        "test_accuracy": float(results["accuracy"]),
        **data_summary,
        "certified": robustness.certified_accuracy(model, x_test, y_test, certified_radii).to_dict(),
    }
    runs.write_json(out_dir, runs.METRICS, metrics)
    model.reset_metrics()  # the saved metric states would hold the evaluation's exact counts (private in a search)
    model.save(runs.path(out_dir, runs.MODEL))
    if model.mechanism.certifies_layer_bounds:
        report = sensitivity.report(model)
    else:
        report = f"{model.mechanism.describe()}: per-sample gradients clipped, no analytic bounds"
    runs.write_text(out_dir, runs.SENSITIVITY, report + "\n")
    runs.write_json(out_dir, runs.PRIVACY, privacy)  # last: marks the run complete
    return model, metrics
