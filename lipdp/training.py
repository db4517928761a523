"""A training run from a config: data, model, sampler, privacy, fit, artefacts.

``run(config, out_dir)`` writes into ``out_dir``:

* ``config.yaml``: the resolved config;
* ``history.csv``: per-epoch training logs (training metrics are on private
  data and not covered by the guarantee), validation metrics on the test
  set, ``epsilon``, and ``heldout_grad_to_noise`` (gradient-to-noise ratio
  measured on a held-out test batch, :class:`lipdp.callbacks.GradientNoiseMonitor`);
* ``model.keras``: the trained model (``tf.keras.models.load_model``);
* ``sensitivity.txt``: the per-layer bound report (clipless models);
* ``privacy.json``: epsilon, delta, noise multiplier, sampling rate and kind,
  steps, accountant (and clipping rule, if any);
* ``metrics.json``: final test loss and accuracy.

An interrupted run resumes from ``out_dir/backup`` when started again with the
same command; a completed run is never overwritten.
"""

import json
import os
import warnings

import tensorflow as tf
import yaml

from lipdp import callbacks, config as config_lib, data, losses, sampling, sensitivity
from lipdp.layers import InputNormClip
from lipdp.model import DPSequential
from lipdp.errors import RunExistsError


def build_layers(cfg: config_lib.Config, input_shape):
    """Fresh layers for ``cfg.model``: an input, an :class:`InputNormClip`, then the configured layers."""
    layers = [tf.keras.Input(input_shape), InputNormClip(cfg.model.input_norm)]
    for spec in cfg.model.layers:
        arguments = {k: v for k, v in spec.items() if k != "type"}
        layers.append(config_lib.layer_class(spec["type"])(**arguments))
    return layers


def build_model(cfg: config_lib.Config, input_shape):
    """The compiled DP model described by ``cfg``."""
    layers = build_layers(cfg, input_shape)
    clipping = {}
    if cfg.model.clipping is not None:
        clipping = dict(clipping=cfg.model.clipping, clip_norm=cfg.model.clip_norm, gamma=cfg.model.gamma)
    model = DPSequential(layers, **clipping)  # the noise generator is seeded from OS entropy, never from the config
    loss_cls = getattr(losses, cfg.loss.type, None)
    if loss_cls is None or not isinstance(loss_cls, type) or not issubclass(loss_cls, losses.LipschitzLoss):
        raise config_lib.ConfigError(f"loss.type: {cfg.loss.type!r} is not a lipdp.losses loss")
    optimizer = tf.keras.optimizers.get({  # not the legacy optimizer: model.keras drops a legacy one's state
        "class_name": cfg.optimizer.name,
        "config": {"learning_rate": cfg.optimizer.learning_rate, "is_legacy_optimizer": False}})
    model.compile(optimizer=optimizer, loss=loss_cls(**cfg.loss.params), metrics=["accuracy"])
    return model


def _attempt_number(out_dir):
    """Counts starts of this run, so a resumed run never replays a sampling seed."""
    path = os.path.join(out_dir, "attempts")
    attempt = int(open(path).read()) + 1 if os.path.exists(path) else 0
    with open(path, "w") as handle:
        handle.write(str(attempt))
    return attempt


def run(cfg: config_lib.Config, out_dir, verbose=1):
    """Trains as configured and writes the artefacts; returns the model and ``metrics.json``'s content."""
    if os.path.exists(os.path.join(out_dir, "privacy.json")):
        raise RunExistsError(f"{out_dir} already holds a completed run; choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    tf.keras.utils.set_random_seed(cfg.training.seed)
    dataset = data.load(cfg.dataset.name, data_dir=cfg.dataset.data_dir)
    with open(os.path.join(out_dir, "config.yaml"), "w") as handle:
        yaml.safe_dump(cfg.to_dict(), handle, sort_keys=False)

    model = build_model(cfg, dataset.input_shape)
    seed = cfg.sampling.seed
    if seed is not None:
        warnings.warn("sampling.seed is set: the batches are reproducible, and the privacy amplification by "
                      "subsampling holds only while the seed stays secret (do not publish config.yaml)")
    sampler = sampling.make_sampler(cfg.sampling.kind, dataset.x_train, dataset.y_train,
                                    batch_size=cfg.sampling.batch_size,
                                    seed=None if seed is None else [seed, _attempt_number(out_dir)])
    privacy = cfg.privacy
    model.make_private(sampler, noise_multiplier=privacy.noise_multiplier, target_epsilon=privacy.target_epsilon,
                       epochs=cfg.training.epochs if privacy.target_epsilon is not None else None,
                       delta=privacy.delta, accountant=privacy.accountant,
                       noise_allocation=privacy.noise_allocation)
    backup = os.path.join(out_dir, "backup")
    extra = [callbacks.PrivacyLedger(),
             callbacks.GradientNoiseMonitor(dataset.x_test, dataset.y_test),  # held-out data only
             tf.keras.callbacks.BackupAndRestore(backup),
             tf.keras.callbacks.CSVLogger(os.path.join(out_dir, "history.csv"), append=True)]
    if privacy.epsilon_budget is not None:
        extra.append(callbacks.BudgetStop(privacy.epsilon_budget))
    if verbose:
        print(f"data: {dataset.source}")
        print(f"privacy policy: {model.privacy}")
    model.fit(sampler, epochs=cfg.training.epochs, validation_data=(dataset.x_test, dataset.y_test),
              callbacks=extra, verbose=verbose)
    if os.path.isdir(backup) and not os.listdir(backup):  # Keras empties it once training completes
        os.rmdir(backup)
    return _write_artefacts(model, dataset, out_dir)


def _write_artefacts(model, dataset, out_dir):
    test_loss, test_accuracy = model.evaluate(dataset.x_test, dataset.y_test, verbose=0)
    metrics = {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy),
               "train_size": int(len(dataset.x_train)), "test_size": int(len(dataset.x_test)),
               "data": dataset.source}
    with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    model.save(os.path.join(out_dir, "model.keras"))
    if model.mechanism.certifies_layer_bounds:
        report = sensitivity.report(model)
    else:
        report = f"{model.mechanism.describe()}: per-sample gradients clipped, no analytic bounds\n"
    with open(os.path.join(out_dir, "sensitivity.txt"), "w") as handle:
        handle.write(report + "\n")
    state = model.privacy_state()
    with open(os.path.join(out_dir, "privacy.json"), "w") as handle:
        json.dump(state, handle, indent=2)
    return model, metrics
