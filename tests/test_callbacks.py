"""Privacy ledger, budget stop, and checkpoint/resume with the ledger intact."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp.callbacks import BudgetStop, PrivacyBudgetExhausted, PrivacyLedger

N, BATCH = 300, 30


def make_model():
    tf.keras.utils.set_random_seed(0)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((5,)),
            L.InputNormClip(1.0),
            L.LipschitzDense(6, bias_bound=0.5),
            L.GroupSort(),
            L.LipschitzDense(2),
        ],
        noise_seed=0,
    )
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=lipdp.losses.TauCategoricalCrossentropy(4.0))
    return model


def make_sampler(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = tf.one_hot((x[:, 0] > 0).astype(int), 2).numpy()
    return lipdp.PoissonSampler(x, y, expected_batch_size=BATCH, seed=seed)


def test_ledger_puts_epsilon_in_history_and_csv(tmp_path):
    model, sampler = make_model(), make_sampler()
    policy = model.make_private(sampler, noise_multiplier=1.5)
    csv = tmp_path / "log.csv"
    history = model.fit(sampler, epochs=2, verbose=0, callbacks=[PrivacyLedger(), tf.keras.callbacks.CSVLogger(csv)])
    expected = [policy.epsilon(k * sampler.steps_per_epoch) for k in (1, 2)]
    np.testing.assert_allclose(history.history["epsilon"], expected)
    assert history.history["delta"] == [policy.delta] * 2
    assert "epsilon" in csv.read_text().splitlines()[0]


def test_budget_stop_stops_before_overshooting():
    model, sampler = make_model(), make_sampler()
    policy = model.make_private(sampler, noise_multiplier=1.0)
    budget = policy.epsilon(25) * 1.0001  # between 25 and 26 steps: lands mid-epoch (10 steps/epoch)
    stop = BudgetStop(budget, verbose=0)
    history = model.fit(sampler, epochs=10, verbose=0, callbacks=[stop])
    steps = int(model.privacy_steps)
    assert steps == stop.max_steps == 25
    assert model.epsilon() <= budget < policy.epsilon(steps + 1)
    assert history.history["epsilon"][-1] == pytest.approx(model.epsilon())
    with pytest.raises(PrivacyBudgetExhausted, match="allows 25 steps"):
        model.fit(sampler, epochs=1, verbose=0, callbacks=[BudgetStop(budget)])
    assert int(model.privacy_steps) == 25


class _Interrupt(tf.keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


def test_resume_from_backup_counts_steps_once(tmp_path):
    epochs = 4
    reference, sampler = make_model(), make_sampler()
    reference.make_private(sampler, noise_multiplier=1.2)
    reference.fit(sampler, epochs=epochs, verbose=0)

    backup = str(tmp_path / "backup")
    first = make_model()
    first.make_private(sampler, noise_multiplier=1.2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit(
            sampler,
            epochs=epochs,
            verbose=0,
            callbacks=[tf.keras.callbacks.BackupAndRestore(backup), _Interrupt(at_epoch=2)],
        )
    assert int(first.privacy_steps) == 2 * sampler.steps_per_epoch

    resumed = make_model()  # a fresh process: nothing but the backup survives
    resumed.make_private(sampler, noise_multiplier=1.2)
    resumed.fit(sampler, epochs=epochs, verbose=0, callbacks=[tf.keras.callbacks.BackupAndRestore(backup)])
    assert int(resumed.privacy_steps) == int(reference.privacy_steps) == epochs * sampler.steps_per_epoch
    assert resumed.epsilon() == pytest.approx(reference.epsilon())


def test_shuffled_sampling_refuses_to_resume_mid_epoch():
    model = make_model()
    sampler = make_sampler()
    shuffle = lipdp.ShuffleSampler(sampler.x, sampler.y, batch_size=BATCH)
    model.make_private(shuffle, noise_multiplier=1.0)
    stop_after_one_step = tf.keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: setattr(model, "stop_training", True)
    )
    model.fit(shuffle, epochs=1, verbose=0, callbacks=[stop_after_one_step])
    assert int(model.privacy_steps) == 1
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        model.fit(shuffle, epochs=1, verbose=0)
    assert int(model.privacy_steps) == 1


def test_a_calibrated_plan_is_never_exceeded():
    model, sampler = make_model(), make_sampler()
    policy = model.make_private(sampler, target_epsilon=3.0, epochs=2)
    assert policy.planned_steps == 2 * sampler.steps_per_epoch
    history = model.fit(sampler, epochs=5, verbose=0)
    assert int(model.privacy_steps) == policy.planned_steps
    assert history.history["epsilon"][-1] <= 3.0
    with pytest.raises(PrivacyBudgetExhausted, match="calibrated for 20 steps"):
        model.fit(sampler, epochs=1, verbose=0)
    assert int(model.privacy_steps) == policy.planned_steps
