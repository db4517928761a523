"""Training runs from configs: optimizer options."""

import os

import numpy as np
import pytest
import tensorflow as tf

from lipdp import cli, config, data, runs, training, verification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def test_weight_averaging_is_applied_at_the_end_and_the_bounds_hold(tmp_path):
    """optimizer.ema_momentum: the saved weights are the average of the private iterates (post-processing)."""
    out = str(tmp_path / "run")
    overrides = [
        "optimizer.ema_momentum=0.9",
        "training.epochs=2",
        "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
        " {type: LipschitzDense, units: 10}]",
    ]
    assert (
        cli.main(["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in overrides for a in ("--set", s)]) == 0
    )
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    assert model.optimizer.use_ema and model.optimizer.ema_momentum == 0.9
    digits = data.load("digits")
    assert not verification.verify_bounds(model, digits.x_test[:32], digits.y_test[:32], rtol=0).violations
    with pytest.raises(config.ConfigError, match="ema_momentum"):
        training.build_model(config.load(DIGITS, ["optimizer.ema_momentum=1.5"]), (8, 8, 1))


def test_microbatched_training_run_counts_one_step_per_poisson_batch(tmp_path):
    out = str(tmp_path / "run")
    overrides = ["training.microbatch_size=32", "training.epochs=1", "sampling.batch_size=256"]
    assert (
        cli.main(["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in overrides for a in ("--set", s)]) == 0
    )
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    assert model.microbatch_size == 32 and int(model.privacy_steps) == model.privacy.steps_per_epoch


def test_optimizer_params_and_cosine_decay_follow_the_planned_steps(tmp_path):
    """optimizer.params reach the Keras optimizer; decay=cosine ends at 0 after epochs * steps_per_epoch steps."""
    out = str(tmp_path / "run")
    overrides = [
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.5",
        "optimizer.params={momentum: 0.9, nesterov: true}",
        "optimizer.decay=cosine",
        "training.epochs=2",
    ]
    assert (
        cli.main(["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in overrides for a in ("--set", s)]) == 0
    )
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    optimizer = model.optimizer
    assert isinstance(optimizer, tf.keras.optimizers.SGD) and optimizer.momentum == 0.9 and optimizer.nesterov
    steps = int(model.privacy_steps)
    assert steps == 2 * model.privacy.steps_per_epoch and int(optimizer.iterations) == steps
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(0.5) and float(schedule(steps)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="training steps"):
        training.build_optimizer(config.load(DIGITS, ["optimizer.decay=cosine"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.params={momentun: 0.9}", "did you mean 'momentum'"),
        ("optimizer.params={learning_rate: 0.1}", "optimizer.learning_rate"),
        ("optimizer.name=adamm", "not a Keras optimizer"),
        ("optimizer.decay=cosin", "did you mean 'cosine'"),
    ],
)
def test_optimizer_config_mistakes_are_named(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(DIGITS, ["optimizer.name=sgd", override])


class _CrashAtSecondEpochEnd(tf.keras.callbacks.Callback):
    """Stands in for the run's GradientNoiseMonitor (before BackupAndRestore): a crash after epoch 1's backup."""

    def __init__(self, *args):
        super().__init__()

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("simulated crash")


STATISTICS = "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}"
DENSE_LAYERS = (
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 64}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}]"
)  # the demo's layers without its ClipGradient, which clipping models refuse


def _args(out, *overrides):
    base = ["training.epochs=3", "privacy.target_epsilon=null", "privacy.epsilon_budget=null"]
    return ["train", DIGITS, "--out", out, "--verbose", "0"] + [a for s in base + list(overrides) for a in ("--set", s)]


@pytest.mark.parametrize(
    "first, second, changed",
    [
        (["privacy.noise_multiplier=0.8"], ["privacy.noise_multiplier=4.0"], "policy.noise_multiplier: 0.8 -> 4.0"),
        (
            ["privacy.noise_multiplier=null", "privacy.target_epsilon=1.0"],
            ["privacy.noise_multiplier=null", "privacy.target_epsilon=1.0", "training.epochs=6"],
            "policy.planned_steps",
        ),
        (
            ["privacy.noise_multiplier=2.0"],
            [
                "privacy.noise_multiplier=2.0",
                "model.mechanism.name=flat",
                "model.mechanism.clip_norm=0.1",
                DENSE_LAYERS,
            ],
            "mechanism.name: 'certified' -> 'flat'",
        ),
    ],
)
def test_a_resumed_run_under_changed_privacy_settings_is_refused_naming_them(
    tmp_path, monkeypatch, capsys, first, second, changed
):
    """The issue's case: 3 epochs at 0.8, a crash, resumed at 4.0: privacy.json said 1.01, dp-accounting 8.45."""
    from lipdp import callbacks

    out = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(callbacks, "GradientNoiseMonitor", _CrashAtSecondEpochEnd)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.main(_args(out, *first))
    assert os.path.isdir(os.path.join(out, "backup"))
    assert cli.main(_args(out, *second)) == 2
    error = capsys.readouterr().err
    assert "interrupted run whose steps were taken under other privacy settings" in error and changed in error
    assert cli.main(_args(out, *first)) == 0  # the same settings resume and complete


def _crash_at_second_epoch(monkeypatch, out, *overrides):
    from lipdp import callbacks

    with monkeypatch.context() as patch:
        patch.setattr(callbacks, "GradientNoiseMonitor", _CrashAtSecondEpochEnd)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.main(_args(out, *overrides))
    assert os.path.isdir(os.path.join(out, "backup"))


def test_a_resume_under_another_model_or_optimizer_is_refused_naming_the_change(tmp_path, monkeypatch, capsys):
    out, noise = str(tmp_path / "run"), "privacy.noise_multiplier=2.0"
    _crash_at_second_epoch(monkeypatch, out, noise)
    with open(runs.path(out, runs.CONFIG)) as f:
        first_config = f.read()
    for change, named in [
        (DENSE_LAYERS, "model.layers: "),  # Keras' restore failed with a raw TensorFlow error
        ("optimizer.learning_rate=0.5", "optimizer.learning_rate: "),
        ("loss.params={tau: 2.0}", "loss.params.tau: "),
    ]:
        assert cli.main(_args(out, noise, change)) == 2
        error = capsys.readouterr().err
        assert "interrupted run started under another config" in error and named in error
        with open(runs.path(out, runs.CONFIG)) as f:
            assert f.read() == first_config  # the refused start left the run's config as it was
    assert cli.main(_args(out, noise, "training.epochs=4")) == 0  # a resume may run longer
    assert config.load(runs.path(out, runs.CONFIG)).training.epochs == 4
    assert len(runs.read_history(runs.path(out, runs.HISTORY))["epoch"]) == 4


def test_a_resume_under_a_decaying_learning_rate_may_not_change_its_epochs(tmp_path, monkeypatch, capsys):
    """optimizer.decay=cosine spans the planned steps (epochs * steps per epoch): resumed with more epochs, the
    first epochs would have followed one schedule and the rest another, matching neither config."""
    out, first = str(tmp_path / "run"), ("privacy.noise_multiplier=2.0", "optimizer.decay=cosine")
    _crash_at_second_epoch(monkeypatch, out, *first)
    assert cli.main(_args(out, *first, "training.epochs=4")) == 2
    assert "training.epochs: 3 -> 4" in capsys.readouterr().err


def test_a_resume_may_not_end_the_run_before_the_epochs_it_already_trained(tmp_path, monkeypatch, capsys):
    """3 epochs trained (a crash while saving), resumed with training.epochs=1: the model and history.csv hold 3
    epochs, config.yaml would say 1."""
    out, noise = str(tmp_path / "run"), "privacy.noise_multiplier=2.0"
    _crash_while_saving(monkeypatch, out, noise)
    assert cli.main(_args(out, noise, "training.epochs=1")) == 2
    assert "training.epochs" in capsys.readouterr().err and not runs.is_complete(out)
    assert cli.main(_args(out, noise)) == 0
    assert config.load(runs.path(out, runs.CONFIG)).training.epochs == 3


def test_a_refused_resume_leaves_policy_json_as_it_was(tmp_path, monkeypatch, capsys):
    """policy.json missing (a folder from before it was written, or removed): a resume refused for its config
    must not write the refused policy there, or the first start's config could never resume the run."""
    out = str(tmp_path / "run")
    _crash_at_second_epoch(monkeypatch, out, "privacy.noise_multiplier=0.8")
    os.remove(runs.path(out, runs.POLICY))
    assert cli.main(_args(out, "privacy.noise_multiplier=4.0")) == 2
    assert "privacy.noise_multiplier: 0.8 -> 4.0" in capsys.readouterr().err
    assert not os.path.exists(runs.path(out, runs.POLICY))
    assert cli.main(_args(out, "privacy.noise_multiplier=0.8")) == 0


def test_a_resume_may_change_the_microbatch_size(tmp_path, monkeypatch):
    """Micro-batches change the memory a step takes, not the step: a run that ran out of memory resumes with them."""
    out, noise = str(tmp_path / "run"), "privacy.noise_multiplier=2.0"
    _crash_at_second_epoch(monkeypatch, out, noise)
    assert cli.main(_args(out, noise, "training.microbatch_size=64")) == 0
    assert runs.load_run(out).model.microbatch_size == 64


def test_a_resume_adding_a_release_is_refused_before_the_release(tmp_path, monkeypatch, capsys):
    from lipdp import callbacks

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(callbacks, "GradientNoiseMonitor", _CrashAtSecondEpochEnd)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.main(_args(str(out), "privacy.noise_multiplier=2.0"))
    assert cli.main(_args(str(out), "privacy.noise_multiplier=2.0", STATISTICS)) == 2
    assert "taken after the releases []" in capsys.readouterr().err
    assert not (out / "feature_statistics.json").exists()  # nothing was drawn


@pytest.mark.parametrize("lost", [("feature_statistics.json",), ("feature_statistics.json", "policy.json")])
def test_a_resume_whose_released_statistics_are_lost_is_refused_before_a_second_release(
    tmp_path, monkeypatch, capsys, lost
):
    """feature_statistics.json removed from an interrupted run: its steps were taken after a release (that
    policy.json names, or that its backup implies); drawing another would make two releases of the data where
    the accountant counts one."""
    out, settings = tmp_path / "run", ("privacy.noise_multiplier=2.0", STATISTICS)
    _crash_at_second_epoch(monkeypatch, str(out), *settings)
    for name in lost:
        os.remove(out / name)
    assert cli.main(_args(str(out), *settings)) == 2
    assert "feature_statistics.json" in capsys.readouterr().err
    assert not (out / "feature_statistics.json").exists()  # nothing was drawn


def _crash_while_saving(monkeypatch, out, *overrides):
    """Runs ``overrides`` in ``out`` with a crash once fit is over (in ``_write_artefacts``); returns the model's
    weights and step count at the crash."""
    crashed = []

    def crash(model, *args):
        crashed.append(([w.numpy() for w in model.weights], int(model.privacy_steps)))
        raise RuntimeError("simulated crash while saving")

    with monkeypatch.context() as patch:
        patch.setattr(training, "_write_artefacts", crash)
        with pytest.raises(RuntimeError, match="while saving"):
            cli.main(_args(out, *overrides))
    return crashed[0]


@pytest.mark.parametrize("ema", ["optimizer.ema_momentum=null", "optimizer.ema_momentum=0.9"])
def test_a_crash_after_the_last_epoch_resumes_with_the_trained_weights(tmp_path, monkeypatch, ema):
    """A crash while the artefacts are written (assembling, evaluating, saving) keeps the trained model."""
    out = str(tmp_path / "run")
    weights, _ = _crash_while_saving(monkeypatch, out, "privacy.noise_multiplier=2.0", ema)
    assert cli.main(_args(out, "privacy.noise_multiplier=2.0", ema)) == 0
    run = runs.load_run(out)
    assert len(runs.read_history(runs.path(out, runs.HISTORY))["epoch"]) == 3  # no epoch trained twice
    assert run.privacy["steps"] == 3 * run.privacy["steps_per_epoch"]
    for trained, saved in zip(weights, run.model.weights, strict=True):
        np.testing.assert_array_equal(trained, saved.numpy())
    assert not os.path.exists(runs.path(out, runs.BACKUP))


@pytest.mark.parametrize("ema", ["optimizer.ema_momentum=null", "optimizer.ema_momentum=0.9"])
def test_a_budget_stopped_run_that_crashed_while_saving_resumes_and_writes_its_artefacts(tmp_path, monkeypatch, ema):
    """privacy.epsilon_budget stops training (here after 3 of 18 steps), then a crash while saving: the resume
    must write the trained model, not refuse it as over budget (BudgetStop raised at on_train_begin, after the
    backup's restore, although no step was left to take: the folder could never be completed)."""
    out, budget = str(tmp_path / "run"), ["privacy.noise_multiplier=1.0", "privacy.epsilon_budget=3.0", ema]
    weights, steps = _crash_while_saving(monkeypatch, out, *budget)
    assert cli.main(_args(out, *budget)) == 0
    run = runs.load_run(out)
    assert run.privacy["steps"] == steps and run.privacy["epsilon"] <= 3.0
    for trained, saved in zip(weights, run.model.weights, strict=True):
        np.testing.assert_array_equal(trained, saved.numpy())


def test_a_budget_stopped_run_resumed_under_a_lower_budget_is_refused(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    _crash_while_saving(monkeypatch, out, "privacy.noise_multiplier=1.0", "privacy.epsilon_budget=3.0")
    assert cli.main(_args(out, "privacy.noise_multiplier=1.0", "privacy.epsilon_budget=2.0")) == 2
    assert "were already taken" in capsys.readouterr().err
    assert not runs.is_complete(out)


def test_a_resume_whose_steps_its_policy_cannot_state_leaves_no_model(tmp_path, monkeypatch, capsys):
    """policy.json and config.yaml deleted, the noise changed, no step left: refused before any artefact is
    written (with config.yaml kept, the changed config is refused first)."""
    out = str(tmp_path / "run")
    _crash_while_saving(monkeypatch, out, "privacy.noise_multiplier=0.8")
    os.remove(runs.path(out, runs.POLICY))
    os.remove(runs.path(out, runs.CONFIG))
    assert cli.main(_args(out, "privacy.noise_multiplier=4.0")) == 2
    assert "under another privacy policy" in capsys.readouterr().err
    assert not os.path.exists(runs.path(out, runs.MODEL)) and not runs.is_complete(out)


NARROWER_LAYERS = DENSE_LAYERS.replace("units: 64", "units: 32")


@pytest.mark.parametrize(
    "lost, refused",
    [
        ((runs.POLICY, runs.CONFIG), ("privacy.noise_multiplier=4.0",)),  # refused in privacy_state, after the writes
        ((runs.CONFIG,), ("privacy.noise_multiplier=0.8", NARROWER_LAYERS)),  # refused by Keras' restore, in fit
    ],
)
def test_a_resume_refused_after_the_records_are_written_leaves_the_first_config_able_to_resume(
    tmp_path, monkeypatch, lost, refused
):
    """policy.json or config.yaml missing (removed, or a folder from before they were written): a resume refused
    only once fit restored the backup has by then written its refused policy.json and config.yaml, and the first
    start's config, the one that can finish the run, is then refused against them."""
    out, noise = str(tmp_path / "run"), "privacy.noise_multiplier=0.8"
    _crash_while_saving(monkeypatch, out, noise)
    for name in lost:
        os.remove(runs.path(out, name))
    assert cli.main(_args(out, *refused)) == 2
    assert cli.main(_args(out, noise)) == 0


def test_a_resume_whose_backup_was_removed_after_epochs_were_logged_is_refused(tmp_path, monkeypatch):
    """backup/ removed from an interrupted run: the resume trains from fresh weights and appends to history.csv,
    whose rows of the first start (validation metrics, epsilon, held-out gradient-to-noise: outputs of its private
    steps) then sit in a folder whose privacy.json accounts only the new steps."""
    out, noise = str(tmp_path / "run"), "privacy.noise_multiplier=2.0"
    _crash_at_second_epoch(monkeypatch, out, noise)
    logged = len(runs.read_history(runs.path(out, runs.HISTORY))["epoch"])
    assert logged == 1
    runs.remove_backup(out)
    assert cli.main(_args(out, noise)) == 2
    assert not runs.is_complete(out)


def test_a_seeded_resume_whose_attempt_count_was_removed_is_refused(tmp_path, monkeypatch):
    """attempts removed from an interrupted run under sampling.seed: the resume is attempt 0 again and its sampler
    replays the first start's batches (the same Poisson subsets in epoch 2 as in epoch 1), which the accountant
    counts as fresh draws."""
    out, settings = str(tmp_path / "run"), ("privacy.noise_multiplier=2.0", "sampling.seed=7")
    _crash_at_second_epoch(monkeypatch, out, *settings)
    os.remove(runs.path(out, runs.ATTEMPTS))
    assert cli.main(_args(out, *settings)) == 2
    assert not runs.is_complete(out)


@pytest.mark.parametrize("statistics", [False, True])
def test_a_resume_may_not_switch_the_front_end_to_flip_invariant(tmp_path, monkeypatch, capsys, statistics):
    """The head's input shape is the same: only the config check stands between the backup and other features
    (with released statistics, the release record refuses it first: no second release)."""
    out, noise, cache = str(tmp_path / "run"), "privacy.noise_multiplier=2.0", f"dataset.feature_cache={tmp_path}"
    plain = ["model.frontend={type: Scattering2D, J: 1, L: 4}", noise, cache] + [STATISTICS] * statistics
    flipped = ["model.frontend={type: Scattering2D, J: 1, L: 4, flip_invariant: true}"] + plain[1:]
    _crash_at_second_epoch(monkeypatch, out, *plain)
    releases = runs.read_json(out, runs.STATISTICS) if statistics else None
    capsys.readouterr()
    assert cli.main(_args(out, *flipped)) == 2
    error = capsys.readouterr().err
    assert ("holds a release made with" if statistics else "model.frontend.flip_invariant") in error
    if statistics:
        assert runs.read_json(out, runs.STATISTICS) == releases
    assert cli.main(_args(out, *plain)) == 0
