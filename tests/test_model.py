"""The clipless DP train step: noise calibration, normalisation, set-up errors, save/load."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp import sensitivity
from lipdp.ledger import ledger_from_json

N, BATCH, SIGMA = 400, 40, 0.8


def make_model(noise_seed=0, big_constraints=False):
    """A small model; with ``big_constraints`` no projection changes the weights after a step."""
    target = 1e6 if big_constraints else 1.0
    tf.keras.utils.set_random_seed(3)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((6,)),
            L.InputNormClip(2.0),
            L.LipschitzDense(8, weight_constraint="spectral", lipschitz_target=target, bias_bound=target),
            L.GroupSort(),
            L.LipschitzDense(3, weight_constraint="spectral", lipschitz_target=target, bias_bound=target),
        ],
        noise_seed=noise_seed,
    )
    model.compile(tf.keras.optimizers.SGD(1.0), loss=lipdp.losses.TauCategoricalCrossentropy(2.0), metrics=["accuracy"])
    return model


def make_data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = tf.one_hot(rng.integers(0, 3, n), 3).numpy()
    return x, y


def true_gradient_sums(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model.loss.call(y, model(x)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("allocation", ["global", "per-layer"])
def test_update_noise_has_the_calibrated_std(allocation):
    """SGD at lr 1: (w_before - w_after) * qN - sum of gradients is the added noise."""
    model = make_model(big_constraints=True)
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH, seed=0)
    model.make_private(sampler, noise_multiplier=SIGMA, noise_allocation=allocation)
    model.allow_unaccounted_steps()  # the same fixed batch 40 times: a measurement, not a private run
    batch_x, batch_y = x[:50], y[:50]
    start = [v.numpy().copy() for v in model.trainable_variables]
    grads = true_gradient_sums(model, batch_x, batch_y)
    bounds = np.array([float(b) for b in sensitivity.gradient_bound_tensors(model)])
    if allocation == "global":
        expected = SIGMA * np.linalg.norm(bounds) * np.ones_like(bounds)
    else:
        expected = SIGMA * np.sqrt(len(bounds)) * bounds
    noises = [[] for _ in start]
    for _ in range(40):
        for variable, value in zip(model.trainable_variables, start):
            variable.assign(value)
        model.train_on_batch(batch_x, batch_y)
        for i, (variable, value, grad) in enumerate(zip(model.trainable_variables, start, grads)):
            noises[i].append((value - variable.numpy()) * BATCH - grad)
    for i, samples in enumerate(noises):
        samples = np.concatenate([s.ravel() for s in samples])
        # std estimate over n Gaussian draws has relative standard error ~ 1/sqrt(2n)
        tolerance = 5 / np.sqrt(2 * samples.size)
        assert np.std(samples) == pytest.approx(expected[i], rel=tolerance), model.trainable_variables[i].name
        assert abs(np.mean(samples)) < 5 * expected[i] / np.sqrt(samples.size)
    assert int(model.privacy_steps) == 40


def test_loss_is_normalised_by_the_expected_batch_size():
    """Averaged over many draws the update is the gradient *sum* over qN, not a batch mean."""
    model = make_model(big_constraints=True)
    x, y = make_data()
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=SIGMA)
    model.allow_unaccounted_steps()
    batch_x, batch_y = x[:10], y[:10]  # realised batch much smaller than qN = 40
    start = [v.numpy().copy() for v in model.trainable_variables]
    grads = true_gradient_sums(model, batch_x, batch_y)
    updates = []
    for _ in range(200):
        for variable, value in zip(model.trainable_variables, start):
            variable.assign(value)
        model.train_on_batch(batch_x, batch_y)
        updates.append(start[-2] - model.trainable_variables[-2].numpy())
    mean_update = np.mean(updates, axis=0)
    noise_std = np.std(np.array(updates) - grads[-2] / BATCH)
    assert np.max(np.abs(mean_update - grads[-2] / BATCH)) < 5 * noise_std / np.sqrt(200)
    assert np.max(np.abs(grads[-2] / 10 - grads[-2] / BATCH)) > 10 * noise_std / np.sqrt(200)


def test_empty_batch_is_a_noise_only_step():
    model = make_model()
    x, y = make_data()
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=SIGMA)
    model.allow_unaccounted_steps()
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.train_on_batch(x[:0], y[:0])
    assert int(model.privacy_steps) == 1
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_same_seed_gives_same_noise():
    x, y = make_data()
    results = []
    for _ in range(2):
        model = make_model(noise_seed=7)
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=SIGMA)
        model.allow_unaccounted_steps().train_on_batch(x[:20], y[:20])
        results.append(model.trainable_variables[0].numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_fit_trains_and_reports_epsilon():
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH, seed=1)
    policy = model.make_private(sampler, target_epsilon=2.0, epochs=3, delta=1e-4)
    history = model.fit(sampler, epochs=3, verbose=0, validation_data=(x[:50], y[:50]))
    assert int(model.privacy_steps) == 3 * sampler.steps_per_epoch
    assert history.history["epsilon"][-1] <= 2.0
    assert history.history["epsilon"][-1] == pytest.approx(policy.epsilon(3 * sampler.steps_per_epoch))
    assert np.all(np.diff(history.history["epsilon"]) > 0)
    assert history.history["val_loss"][-1] > 0
    assert "differentially private" in model.privacy_statement()


def test_fit_refuses_arrays_and_foreign_samplers():
    x, y = make_data()
    model = make_model()
    with pytest.raises(lipdp.model.NotPrivateError):
        model.fit(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH))
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=1.0)
    with pytest.raises(TypeError, match="sampler"):
        model.fit(x, y)
    with pytest.raises(ValueError, match="does not match"):
        model.fit(lipdp.PoissonSampler(x, y, expected_batch_size=2 * BATCH))


def test_make_private_validates_the_model_up_front():
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model = lipdp.DPSequential([tf.keras.Input((6,)), L.InputNormClip(1.0), tf.keras.layers.Dense(2)])
    with pytest.raises(lipdp.model.NotPrivateError, match="compile"):
        model.make_private(sampler, noise_multiplier=1.0)
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy())
    with pytest.raises(sensitivity.ModelNotSupportedError, match="LipschitzDense"):
        model.make_private(sampler, noise_multiplier=1.0)


HALF_PRECISION_CASES = [("global policy", p) for p in ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")] + [
    (where, dtype) for where in ("input clip", "dense") for dtype in ("float16", "bfloat16")
]


@pytest.mark.parametrize("where, half", HALF_PRECISION_CASES)
@pytest.mark.parametrize("mechanism", [None, "flat"])
def test_half_precision_is_refused(where, half, mechanism):
    """A float16 InputNormClip let clipped norms reach 1.0006 of the bound, and noise was drawn in float16."""
    x, y = make_data()
    previous = tf.keras.mixed_precision.global_policy()
    try:
        with pytest.raises(sensitivity.ModelNotSupportedError, match="float32"):
            if where == "global policy":
                tf.keras.mixed_precision.set_global_policy(half)
            layer_dtype = {"dtype": half} if where != "global policy" else {}
            model = lipdp.DPSequential(
                [
                    tf.keras.Input((6,)),
                    L.InputNormClip(2.0, **(layer_dtype if where == "input clip" else {})),
                    L.LipschitzDense(3, **(layer_dtype if where == "dense" else {})),
                ],
                mechanism=mechanism,
            )
            model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy())
            model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=1.0)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def test_steps_outside_a_sampler_fit_are_refused(tmp_path):
    """After a plan was used up, train_on_batch used to run and be counted as Poisson steps."""
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, target_epsilon=2.0, epochs=1)
    model.fit(sampler, epochs=1, verbose=0)
    start = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(lipdp.model.NotPrivateError, match="allow_unaccounted_steps"):
        model.train_on_batch(x[:20], y[:20])
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside fit"):  # the compiled step, in a custom loop
        model.make_train_function()(iter([(tf.constant(x[:20]), tf.constant(y[:20]))]))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(start, model.trainable_variables))
    assert int(model.privacy_steps) == sampler.steps_per_epoch
    assert model.epsilon() <= 2.0


def test_unaccounted_steps_make_the_model_unaccountable_for_good(tmp_path):
    x, y = make_data()
    model = make_model()
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=1.0)
    model.allow_unaccounted_steps().train_on_batch(x[:20], y[:20])
    for report in (model.epsilon, model.privacy_state, model.privacy_statement):
        with pytest.raises(lipdp.model.NotPrivateError, match="unaccountable"):
            report()
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    assert not loaded.accountable
    with pytest.raises(lipdp.model.NotPrivateError, match="unaccountable"):
        loaded.epsilon()
    assert make_model().accountable


def test_impossible_privacy_requests_raise():
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    with pytest.raises(lipdp.accounting.PrivacyParameterError, match="delta"):
        model.make_private(sampler, noise_multiplier=1.0, delta=1.0 / N)
    with pytest.raises(ValueError, match="exactly one"):
        model.make_private(sampler)
    with pytest.raises(lipdp.accounting.PrivacyParameterError):
        model.make_private(sampler, target_epsilon=-1.0, epochs=2)


def test_nan_inputs_raise():
    x, y = make_data()
    model = make_model()
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=1.0)
    model.allow_unaccounted_steps()
    bad = x[:5].copy()
    bad[2, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        model.train_on_batch(bad, y[:5])


@pytest.mark.parametrize("functional", [False, True])
def test_save_and_load_round_trip(tmp_path, functional):
    x, y = make_data()
    if functional:
        inp = tf.keras.Input((6,))
        h = L.InputNormClip(2.0)(inp)
        h = L.Add()([L.LipschitzDense(6, bias_bound=0.5)(h), h])
        model = lipdp.DPModel(inp, L.LipschitzDense(3)(L.GroupSort()(h)), noise_seed=1)
        model.compile("adam", loss=lipdp.losses.MulticlassHinge())
    else:
        model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=1.0)
    model.fit(sampler, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.privacy == model.privacy
    assert int(loaded.privacy_steps) == int(model.privacy_steps) > 0
    assert loaded.epsilon() == pytest.approx(model.epsilon())
    np.testing.assert_allclose(loaded.predict(x[:20], verbose=0), model.predict(x[:20], verbose=0), atol=1e-6)
    loaded.fit(sampler, epochs=1, verbose=0)
    assert int(loaded.privacy_steps) == 2 * sampler.steps_per_epoch


# -- regressions from the privacy audit --------------------------------------------------


def test_noise_generator_is_neither_saved_nor_reproducible_from_the_saved_model(tmp_path):
    x, y = make_data()
    model = make_model(noise_seed=5)
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=1.0)
    assert "noise_seed" not in model.get_config()
    saved = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    assert not [name for name, _ in tf.train.list_variables(saved) if "noise" in name or "state" in name]
    path = str(tmp_path / "m.keras")
    model.save(path)
    updates = []
    for _ in range(2):
        loaded = tf.keras.models.load_model(path).allow_unaccounted_steps()
        loaded.train_on_batch(x[:0], y[:0])  # an empty batch: the update is the noise alone
        updates.append(loaded.trainable_variables[0].numpy())
    assert not np.allclose(updates[0], updates[1])


def test_checkpoints_written_during_fit_hold_no_metric_state(tmp_path):
    """The loss tracker's count is the true number of Poisson-sampled records: not for a backup folder."""
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=1.0)
    backup = str(tmp_path / "backup")
    model.fit(
        sampler,
        epochs=1,
        verbose=0,
        callbacks=[
            tf.keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: tf.train.Checkpoint(model=model).save(backup)
            )
        ],
    )
    names = [name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(str(tmp_path)))]
    assert any("privacy_steps" in name for name in names)
    assert not [name for name in names if "total" in name or "/count" in name or "tracker" in name], names


@pytest.mark.parametrize(
    "saved, changed",
    [("weights", "the earlier policy is unknown"), ("model", r"policy.noise_multiplier: 0.8 -> 20.0")],
)
def test_weights_with_spent_steps_need_their_policy(tmp_path, saved, changed):
    """Loaded weights (no config: policy unknown) or a saved model (its config names what changed)."""
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=0.8)
    model.fit(sampler, epochs=1, verbose=0)
    if saved == "weights":
        model.save_weights(str(tmp_path / "w"))
        fresh = make_model()
        fresh.load_weights(str(tmp_path / "w"))
    else:
        model.save(str(tmp_path / "m.keras"))
        fresh = tf.keras.models.load_model(str(tmp_path / "m.keras"))
    assert fresh.steps_taken == sampler.steps_per_epoch
    with pytest.raises(ValueError, match=f"already took .* private steps.*{changed}"):
        fresh.make_private(sampler, noise_multiplier=20.0)
    fresh.make_private(sampler, noise_multiplier=0.8)  # the same policy goes on (its fingerprint was saved)
    fresh.fit(sampler, epochs=1, verbose=0)
    assert fresh.steps_taken == 2 * sampler.steps_per_epoch


def test_fit_revalidates_a_recompiled_model():
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=1.0)
    model.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(), steps_per_execution=10)
    with pytest.raises(sensitivity.ModelNotSupportedError, match="steps_per_execution"):
        model.fit(sampler, epochs=1, verbose=0)
    assert int(model.privacy_steps) == 0


def test_training_metrics_do_not_outlive_fit():
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model.make_private(sampler, noise_multiplier=1.0)
    model.fit(sampler, epochs=1, verbose=0)
    assert all(float(v) == 0.0 for m in model.metrics for v in m.variables)


def test_outputs_with_positions_are_refused():
    model = lipdp.DPSequential([tf.keras.Input((4, 6)), L.InputNormClip(1.0), L.LipschitzDense(3)])
    model.compile("sgd", loss=lipdp.losses.MulticlassHinge())
    x = np.zeros((20, 4, 6), np.float32)
    y = np.zeros((20, 4, 3), np.float32)
    with pytest.raises(sensitivity.ModelNotSupportedError, match="one logit vector per sample"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=5), noise_multiplier=1.0)


def test_samplers_refuse_non_finite_data():
    x, y = make_data()
    x[3, 2] = np.inf
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)


def test_privacy_state_carries_the_dp_accounting_ledger():
    x, y = make_data()
    model = make_model()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    policy = model.make_private(sampler, noise_multiplier=1.3)
    model.fit(sampler, epochs=1, verbose=0)
    state = model.privacy_state()
    event = ledger_from_json(state["ledger"])
    accountant = lipdp.accounting.make_accountant("rdp")
    accountant.compose(event)
    assert accountant.get_epsilon(policy.delta) == pytest.approx(state["epsilon"])
    assert state["steps"] == sampler.steps_per_epoch and state["mechanism"] == {"name": "certified"}


@pytest.mark.parametrize("mechanism", [None, "flat"])
@pytest.mark.parametrize("batch", [0, 7, 50])
def test_microbatched_sums_equal_the_whole_batch(mechanism, batch):
    """One logical step: the same sums, predictions, losses and sensitivity, whatever the micro-batch size."""
    x, y = make_data()
    whole = make_model()
    parts = lipdp.DPSequential.from_config({**whole.get_config(), "microbatch_size": 16})
    parts.set_weights(whole.get_weights())
    for model in (whole, parts):
        model.mechanism = lipdp.mechanisms.get(mechanism)
        model.compile(tf.keras.optimizers.SGD(1.0), loss=lipdp.losses.TauCategoricalCrossentropy(2.0))

    def flat(result):
        y_pred, losses, sums, sensitivity_ = result
        return y_pred, losses, sums, sensitivity_.total

    expected = flat(whole.private_gradient_sums(x[:batch], y[:batch]))
    spec = (tf.TensorSpec((None, 6)), tf.TensorSpec((None, 3)))
    in_graph = tf.function(lambda a, b: flat(parts.private_gradient_sums(a, b)), input_signature=spec)
    for got in (flat(parts.private_gradient_sums(x[:batch], y[:batch])), in_graph(x[:batch], y[:batch])):
        for a, b in zip(expected[2], got[2]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), rtol=1e-6)
        np.testing.assert_allclose(got[1].numpy(), expected[1].numpy(), rtol=1e-6)
        assert got[0].shape[0] == batch
        np.testing.assert_allclose(float(got[3]), float(expected[3]), rtol=1e-12)


@pytest.mark.parametrize("microbatch_size", [None, 8])
def test_conv_model_takes_an_empty_poisson_batch(microbatch_size):
    """TF's oneDNN conv returns an empty batch unchanged ((0, H, W, C)): GroupSort after it used to crash."""
    tf.keras.utils.set_random_seed(0)
    model = lipdp.DPSequential(
        [
            tf.keras.Input((8, 8, 1)),
            L.InputNormClip(1.0),
            L.LipschitzConv2D(4, 3, padding="valid", bias_bound=0.5),
            L.GroupSort(),
            L.Flatten(),
            L.LipschitzDense(3),
        ],
        noise_seed=0,
        microbatch_size=microbatch_size,
    )
    model.compile(tf.keras.optimizers.SGD(1.0), loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(20) % 3]
    model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=5), noise_multiplier=1.0)
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.allow_unaccounted_steps().train_on_batch(x[:0], y[:0])  # the compiled (graph) step
    assert int(model.privacy_steps) == 1
    assert all(not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables))  # noise only
    model.train_on_batch(x[:11], y[:11])
    assert int(model.privacy_steps) == 2


def test_xla_compiled_steps_are_refused():
    """XLA drops tf.debugging.Assert: the sampler gate would not hold (review finding: 3 unsampled steps counted)."""
    x, y = make_data()
    model = make_model()
    model.compile(tf.keras.optimizers.SGD(1.0), loss=lipdp.losses.TauCategoricalCrossentropy(2.0), jit_compile=True)
    with pytest.raises(sensitivity.ModelNotSupportedError, match="jit_compile"):
        model.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=BATCH), noise_multiplier=1.0)


class _CrashAfterEpoch(tf.keras.callbacks.Callback):
    """Raises at the end of epoch ``epoch`` (after the backup written before it in the callback list)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _crash_then_resume(backup, first, second, epochs=3):
    """Trains under ``first`` policy arguments until a crash after epoch 2, then resumes under ``second``."""
    x, y = make_data()
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=BATCH)
    model = make_model()
    model.make_private(sampler, **first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(
            sampler,
            epochs=epochs,
            verbose=0,
            callbacks=[tf.keras.callbacks.BackupAndRestore(backup), _CrashAfterEpoch(1)],
        )
    resumed = make_model()
    resumed.make_private(sampler, **second)
    resumed.fit(sampler, epochs=epochs, verbose=0, callbacks=[tf.keras.callbacks.BackupAndRestore(backup)])
    return resumed, sampler


def test_a_backup_restored_under_another_policy_is_refused_before_a_step(tmp_path):
    """The issue's case: 0.8 then 4.0 would be accounted as 4.0 throughout (8x under)."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="under another privacy policy"):
        _crash_then_resume(str(tmp_path / "backup"), {"noise_multiplier": 0.8}, {"noise_multiplier": 4.0})


def test_a_backup_restored_under_a_recalibrated_target_is_refused(tmp_path):
    """Target epsilon with more epochs calibrates more noise: the earlier steps took less."""
    first = {"target_epsilon": 2.0, "epochs": 3}
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"planned_steps.{0,3}: 60"):
        _crash_then_resume(str(tmp_path / "backup"), first, {"target_epsilon": 2.0, "epochs": 6}, epochs=3)


def test_a_backup_restored_under_the_same_policy_resumes_and_counts_every_step(tmp_path):
    model, sampler = _crash_then_resume(str(tmp_path / "backup"), {"noise_multiplier": 0.8}, {"noise_multiplier": 0.8})
    assert model.steps_taken == 3 * sampler.steps_per_epoch
    record = lipdp.records.privacy_record(model.privacy, model.mechanism)
    assert model.privacy_fingerprint.numpy() == lipdp.records.fingerprint(record)
