"""Per-sample losses: the declared logit Lipschitz constant against autograd.

For every loss of :mod:`lipdp.losses`, the per-sample gradient norm with
respect to the logits (``tf.GradientTape``, no use of the bound code) must not
exceed ``logit_lipschitz(C)`` on random, huge, tiny and zero logits, one-hot
and soft labels, and logits found by gradient ascent on the gradient norm. The
bound must also be reasonably tight: some input reaches more than half of it
(the measured ratio is logged as ``tightness``). The losses must be per sample
(one value each, independent of the rest of the batch) and serialisable.
"""

import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from lipdp import losses

log = logging.getLogger(__name__)
RTOL = 1e-5

LOSSES = {
    "tau_cce_0.1": lambda: losses.TauCategoricalCrossentropy(tau=0.1),
    "tau_cce_1": lambda: losses.TauCategoricalCrossentropy(tau=1.0),
    "tau_cce_8": lambda: losses.TauCategoricalCrossentropy(tau=8.0),
    "tau_cce_100": lambda: losses.TauCategoricalCrossentropy(tau=100.0),
    "hinge": lambda: losses.MulticlassHinge(),
    "hinge_margin_0.2": lambda: losses.MulticlassHinge(min_margin=0.2),
    "hkr_alpha_0": lambda: losses.HingeKR(alpha=0.0),
    "hkr_alpha_10": lambda: losses.HingeKR(alpha=10.0),
    "hkr_alpha_50_margin_2": lambda: losses.HingeKR(alpha=50.0, min_margin=2.0),
    "kcos_0.5": lambda: losses.KCosineSimilarity(K=0.5),
    "kcos_1": lambda: losses.KCosineSimilarity(K=1.0),
    "kcos_10": lambda: losses.KCosineSimilarity(K=10.0),
}
CLASSES = [2, 3, 10]


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)


def per_sample_gradients(loss, y, z, dtype=tf.float32):
    """Loss values and the gradient of each sample's loss w.r.t. its own logits."""
    y = tf.constant(y, dtype)
    z = tf.constant(z, dtype)
    with tf.GradientTape() as tape:
        tape.watch(z)
        values = loss.call(y, z)
        total = tf.reduce_sum(values)  # samples are independent: d total / d z_i = d loss_i / d z_i
    return values.numpy(), tape.gradient(total, z).numpy().astype(np.float64)


def labels(rng, n, classes, soft):
    if soft:
        return rng.dirichlet(np.full(classes, 0.5), size=n)
    return np.eye(classes)[rng.integers(0, classes, n)]


def gradient_norm_ascent(loss, y, z, steps=15, step=0.3):
    """Normalised gradient ascent of ||d loss_i / d z_i||^2 over the logits, per sample."""
    y = tf.constant(y, tf.float32)
    z = tf.Variable(z.astype("float32"))
    scale = float(np.mean(np.linalg.norm(z.numpy(), axis=1))) + 1e-3
    for _ in range(steps):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = tf.reduce_sum(loss.call(y, z))
            grad = inner.gradient(total, z)
            objective = tf.reduce_sum(tf.square(grad))
        direction = outer.gradient(objective, z)
        if direction is None:  # piecewise-linear losses: the gradient norm is locally constant
            break
        size = tf.maximum(tf.norm(direction, axis=1, keepdims=True), 1e-12)
        z.assign_add(step * scale * direction / size)
    return z.numpy()


def attaining_logits(name, y, classes, rng):
    """Logits at which each loss reaches (or approaches) its declared bound, from its derivation."""
    if name.startswith("tau"):  # p = softmax(tau z) concentrated on a wrong class: ||p - y|| -> sqrt(2)
        wrong = (np.argmax(y, axis=1) + 1) % classes
        return np.eye(classes)[wrong] * 3000.0
    if name.startswith("hinge") or name.startswith("hkr"):  # every margin active
        return -(2 * y - 1) * 5.0
    return rng.normal(size=y.shape) * 1e-4  # ||z|| < 1/K: the linear regime, gradient norm K


def logit_batches(name, classes, rng):
    """``(kind, labels, logits)``: generic logits, logits built from the derivation, and ascent."""
    n = 6
    hard, soft = labels(rng, n, classes, False), labels(rng, n, classes, True)
    base = rng.normal(size=(n, classes))
    cases = []
    for y in (hard, soft):
        for z in (base * 3.0, base * 1e4, base * 1e-6, np.zeros_like(base), -base * 30.0, (2 * y - 1) * 0.2):
            cases.append(("random/huge/tiny/zero", y, z))
        cases.append(("constructed", y, attaining_logits(name, y, classes, rng)))
    both = np.concatenate([hard, soft])
    cases.append(("gradient ascent", both, gradient_norm_ascent(LOSSES[name](), both, np.concatenate([base, base]))))
    return cases


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_logit_gradient_norm_is_within_the_declared_constant(name, classes):
    loss = LOSSES[name]()
    bound = loss.logit_lipschitz(classes)
    assert np.isfinite(bound) and bound > 0
    rng = np.random.default_rng(classes)
    worst = {}
    for kind, y, z in logit_batches(name, classes, rng):
        for dtype in (tf.float32, tf.float64):
            values, grads = per_sample_gradients(loss, y, z, dtype)
            assert values.shape == (len(z),)
            assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
            measured = np.linalg.norm(grads, axis=1)
            assert np.all(measured <= bound * (1 + RTOL)), (name, classes, kind, measured.max(), bound, z)
            worst[kind] = max(worst.get(kind, 0.0), measured.max() / bound)
    log.warning(
        "tightness %-24s C=%-3d grad norm / logit_lipschitz: %s",
        name,
        classes,
        ", ".join(f"{kind} {ratio:.4f}" for kind, ratio in worst.items()),
    )
    assert max(worst.values()) > 0.5, f"{name}: the declared constant {bound} is never approached ({worst})"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_declared_constants_match_their_derivations(name):
    loss = LOSSES[name]()
    for classes in CLASSES:
        value = loss.logit_lipschitz(classes)
        if isinstance(loss, losses.TauCategoricalCrossentropy):
            expected = np.sqrt(2.0)
        elif isinstance(loss, losses.HingeKR):
            expected = (1 + loss.alpha) / np.sqrt(classes)
        elif isinstance(loss, losses.MulticlassHinge):
            expected = 1 / np.sqrt(classes)
        else:
            expected = loss.K
        assert value == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_sample_loss_depends_only_on_that_sample(name):
    loss = LOSSES[name]()
    rng = np.random.default_rng(1)
    classes = 4
    y = labels(rng, 5, classes, soft=False)
    z = (rng.normal(size=(5, classes)) * 2).astype("float32")
    values = loss.call(tf.constant(y, tf.float32), tf.constant(z)).numpy()
    assert values.shape == (5,)
    alone = np.array(
        [loss.call(tf.constant(y[i : i + 1], tf.float32), tf.constant(z[i : i + 1])).numpy()[0] for i in range(5)]
    )
    np.testing.assert_allclose(values, alone, rtol=1e-6, atol=1e-6)
    # other samples replaced by extreme logits and other labels: sample 0 unchanged
    z_other = z.copy()
    z_other[1:] = rng.normal(size=(4, classes)) * 1e5
    y_other = y.copy()
    y_other[1:] = labels(rng, 4, classes, soft=True)
    changed = loss.call(tf.constant(y_other, tf.float32), tf.constant(z_other)).numpy()
    assert changed[0] == pytest.approx(values[0], rel=1e-6, abs=1e-6)
    # the Jacobian of the per-sample losses w.r.t. the batch of logits is block diagonal
    logits = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        out = loss.call(tf.constant(y, tf.float32), logits)
    jac = tape.jacobian(out, logits).numpy()  # (5, 5, classes)
    off_diagonal = jac * (1 - np.eye(5))[:, :, None]
    np.testing.assert_array_equal(off_diagonal, 0)
    # the Keras call reduces the per-sample values by their mean
    assert float(loss(tf.constant(y, tf.float32), tf.constant(z))) == pytest.approx(values.mean(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_config_round_trips(name):
    loss = LOSSES[name]()
    config = loss.get_config()
    through_json = json.loads(json.dumps(config))
    clone = type(loss).from_config(through_json)
    assert clone.get_config() == config
    restored = tf.keras.losses.deserialize(json.loads(json.dumps(tf.keras.losses.serialize(loss))))
    assert type(restored) is type(loss) and restored.get_config() == config
    assert tf.keras.utils.get_registered_name(type(loss)) == f"lipdp>{type(loss).__name__}"
    rng = np.random.default_rng(2)
    y = labels(rng, 4, 5, soft=True).astype("float32")
    z = rng.normal(size=(4, 5)).astype("float32")
    np.testing.assert_array_equal(restored.call(y, z).numpy(), loss.call(y, z).numpy())
    assert restored.logit_lipschitz(5) == loss.logit_lipschitz(5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: losses.TauCategoricalCrossentropy(tau=0.0),
        lambda: losses.TauCategoricalCrossentropy(tau=-1.0),
        lambda: losses.HingeKR(alpha=-0.1),
        lambda: losses.KCosineSimilarity(K=0.0),
    ],
)
def test_invalid_parameters_are_refused(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------------------------------------
# Labels a record may hold: the constants must survive them (they are projected, not trusted)
# ---------------------------------------------------------------------------------------------

HOSTILE_LABELS = {
    "scaled_x100": lambda y: 100.0 * y,
    "negative": lambda y: -3.0 * y,
    "nan": lambda y: np.where(y > 0, np.nan, y),
    "all_zero": np.zeros_like,
}


@pytest.mark.parametrize("label_kind", sorted(HOSTILE_LABELS))
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: losses.TauCategoricalCrossentropy(4.0),
        losses.MulticlassHinge,
        lambda: losses.HingeKR(alpha=5.0),
        lambda: losses.KCosineSimilarity(K=2.0),
    ],
)
def test_hostile_labels_keep_the_lipschitz_constant(make_loss, label_kind):
    loss = make_loss()
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(16, 5)) * 3, tf.float32)
    labels = HOSTILE_LABELS[label_kind](np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        values = loss.call(tf.constant(labels, tf.float32), logits)
        total = tf.reduce_sum(values)
    grads = tape.gradient(total, logits).numpy()
    assert np.all(np.isfinite(values.numpy())) and np.all(np.isfinite(grads))
    assert np.linalg.norm(grads, axis=1).max() <= loss.logit_lipschitz(5) * (1 + 1e-5)


def test_labels_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="do not match logits"):
        losses.TauCategoricalCrossentropy().call(tf.zeros((4,)), tf.zeros((4, 4)))
