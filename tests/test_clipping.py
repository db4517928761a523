"""Clipping rules (lipdp.clipping): fast per-example norms, rules, shared noise/accounting, tf-privacy cross-check."""

import logging
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import clipping as clip_lib
from lipdp import layers as L
from lipdp import mechanisms, sensitivity

K = tf.keras.layers
CE = tf.keras.losses.CategoricalCrossentropy(from_logits=True)


def per_example_gradients(model, x, y):
    """Independent one-example gradients (no fast rule): one ``(batch, *shape)`` array per variable."""
    variables = model.trainable_variables

    def one_example(sample):
        xi, yi = sample
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(clip_lib.per_sample_losses(model.loss, yi[None], model(xi[None], training=True)))
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.cast(tf.convert_to_tensor(g), tf.float64) for g in grads]

    grads = tf.vectorized_map(
        one_example, (tf.convert_to_tensor(x), tf.convert_to_tensor(y)), fallback_to_while_loop=True
    )
    return [g.numpy() for g in grads]


def reference_norms(model, x, y):
    """Whole-model per-example gradient norms from :func:`per_example_gradients`."""
    grads = per_example_gradients(model, x, y)
    return np.sqrt(sum(np.sum(np.square(g).reshape(len(g), -1), axis=1) for g in grads))


def images(n=6, size=9, channels=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, size, size, channels)).astype("float32"),
        tf.one_hot(rng.integers(0, classes, n), classes).numpy(),
    )


def vectors(n=6, dim=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype("float32"), tf.one_hot(rng.integers(0, classes, n), classes).numpy()


def compiled(model, loss=CE, optimizer="sgd"):
    model.compile(optimizer, loss=loss)
    return model


# -- fast per-example norms ---------------------------------------------------------
def dense_model():
    return compiled(
        lipdp.DPSequential(
            [tf.keras.Input((5,)), K.Dense(7, activation="tanh"), K.Dense(6, use_bias=False), K.ReLU(), K.Dense(3)],
            mechanism="flat",
        )
    ), vectors()


def conv_model(strides, padding):
    def build():
        return compiled(
            lipdp.DPSequential(
                [
                    tf.keras.Input((9, 9, 3)),
                    K.Conv2D(4, 3, strides=strides, padding=padding, activation="relu"),
                    K.Conv2D(5, (2, 3), strides=strides, padding=padding, use_bias=False),
                    K.Flatten(),
                    K.Dense(4),
                ],
                mechanism="flat",
            )
        ), images()

    return build


def lipschitz_model():
    model = lipdp.DPSequential(
        [
            tf.keras.Input((8, 8, 2)),
            L.InputNormClip(3.0),
            L.LipschitzConv2D(4, 3, strides=2, bias_bound=0.5),
            L.GroupSort(),
            L.Flatten(),
            L.LipschitzDense(6, bias_bound=0.5),
            L.GroupSort(),
            L.LipschitzDense(3),
        ],
        mechanism="flat",
    )
    return compiled(model, lipdp.losses.TauCategoricalCrossentropy(4.0)), images(size=8, channels=2, classes=3)


def mixed_functional_model():
    inp = tf.keras.Input((8, 8, 3))
    h = K.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = K.MaxPooling2D()(h)
    h = K.Add()([K.Conv2D(4, 1)(h), h])
    h = K.LayerNormalization()(K.Flatten()(h))
    out = K.Dense(3)(K.Dense(6, activation="relu")(h))
    return compiled(lipdp.DPModel(inp, out, mechanism="flat")), images(size=8, classes=3)


def sequence_model():
    """Embedding and sequence Dense (Gram form), LayerNormalization, EinsumDense."""
    model = lipdp.DPSequential(
        [
            tf.keras.Input((5,), dtype="int32"),
            K.Embedding(11, 4),
            K.Dense(6, activation="tanh"),
            K.LayerNormalization(),
            K.EinsumDense("btc,cd->btd", output_shape=(5, 3), bias_axes="d"),
            K.GlobalAveragePooling1D(),
            K.Dense(3),
        ],
        mechanism="flat",
    )
    rng = np.random.default_rng(1)
    # repeated tokens inside an example exercise the embedding rule's de-duplication
    return compiled(model), (rng.integers(0, 11, (6, 5)).astype("int32"), tf.one_hot(rng.integers(0, 3, 6), 3).numpy())


def nested_model():
    """A functional model inside a functional model, its output added to the outer branch's."""
    inner_input = tf.keras.Input((6,))
    inner = tf.keras.Model(inner_input, K.LayerNormalization()(K.Dense(6, activation="relu")(inner_input)))
    inp = tf.keras.Input((5,))
    h = K.Dense(6)(inp)
    out = K.Dense(3)(K.Add()([inner(h), h]))
    return compiled(lipdp.DPModel(inp, out, mechanism="flat")), vectors()


def fallback_model():
    """PReLU has no fast rule; the Dense applied twice (shared weights) cannot add per-call norms."""
    inp = tf.keras.Input((5,))
    shared = K.Dense(5, activation="tanh", name="shared_dense")
    h = shared(K.PReLU(name="prelu")(K.Dense(5)(inp)))
    out = K.Dense(3)(shared(h))
    return compiled(lipdp.DPModel(inp, out, mechanism="flat")), vectors()


MODELS = {
    "dense": dense_model,
    **{f"conv-s{s}-{p}": conv_model(s, p) for s in (1, 2) for p in ("same", "valid")},
    "lipschitz": lipschitz_model,
    "mixed": mixed_functional_model,
    "sequence": sequence_model,
    "nested": nested_model,
    "fallback": fallback_model,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_norms_match_per_example_gradients(name):
    tf.keras.utils.set_random_seed(0)
    model, (x, y) = MODELS[name]()
    expected = reference_norms(model, x, y)
    methods = ("gram", "direct") if name.startswith("conv") else ("auto",)
    for method in methods:
        norms = clip_lib.per_example_gradient_norms(model, x, y, clip_lib.make_layer_registry(method)).numpy()
        np.testing.assert_allclose(norms, expected, rtol=1e-4, err_msg=method)
    assert expected.min() > 0


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("conv")] + ["lipschitz", "mixed"])
def test_conv_norms_with_tf_image_extract_patches(name, monkeypatch):
    """The im2col of deep patches (every patch here is shallow enough for the identity convolution)."""
    monkeypatch.setattr(clip_lib.layer_rules, "CONV_PATCHES_MAX_DEPTH", 0)
    test_fast_norms_match_per_example_gradients(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_is_the_weighted_sum_of_per_example_gradients(name):
    """sum_i min(1, R/||g_i||) g_i: book-kept linear layers, fallback sums and the weighted backward pass."""
    tf.keras.utils.set_random_seed(0)
    model, (x, y) = MODELS[name]()
    per_example = per_example_gradients(model, x, y)
    norms = np.sqrt(sum(np.sum(np.square(g).reshape(len(x), -1), axis=1) for g in per_example))
    clip_norm = float(np.median(norms))  # half of the examples are clipped
    model.mechanism = clip_lib.FlatClipping(clip_norm)
    weights = np.minimum(1.0, clip_norm * (1 - clip_lib.CLIP_MARGIN) / norms)
    _, _, sums, _ = model.private_gradient_sums(x, y)
    for g, total in zip(per_example, sums):
        expected = np.tensordot(weights, g, axes=1)
        np.testing.assert_allclose(total.numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_fast_norms_inside_a_graph_with_an_unknown_batch_size():
    """As in a Poisson-sampled train step: traced once for any batch size, including an empty batch."""
    tf.keras.utils.set_random_seed(0)
    model, (x, y) = fallback_model()  # fast rules and the vectorized_map fallback
    spec = (tf.TensorSpec((None, 5)), tf.TensorSpec((None, 3)))
    graph_norms = tf.function(lambda a, b: clip_lib.per_example_gradient_norms(model, a, b), input_signature=spec)
    np.testing.assert_allclose(graph_norms(x, y).numpy(), reference_norms(model, x, y), rtol=1e-4)
    assert graph_norms(x[:0], y[:0]).shape == (0,)


@pytest.mark.parametrize("name", ["conv-s1-valid", "conv-s2-same", "sequence", "fallback"])
def test_an_empty_batch_gives_zero_sums_inside_a_graph(name):
    """oneDNN's Conv2D returns a wrongly shaped output for a batch of zero: the step must still be a no-op."""
    tf.keras.utils.set_random_seed(0)
    model, (x, y) = MODELS[name]()
    spec = (tf.TensorSpec((None,) + x.shape[1:], x.dtype), tf.TensorSpec((None,) + y.shape[1:], y.dtype))
    step = tf.function(lambda a, b: model.private_gradient_sums(a, b)[:3], input_signature=spec)
    y_pred, losses, sums = step(x[:0], y[:0])
    assert y_pred.shape[0] == losses.shape[0] == 0
    assert all(not np.any(g.numpy()) for g in sums)
    _, _, full_sums = step(x, y)  # the same graph on a real batch
    assert any(np.any(g.numpy()) for g in full_sums)
    assert clip_lib.per_example_gradient_norms(model, x[:0], y[:0]).shape == (0,)  # the public norms too


def test_fallback_warns_once_naming_the_layer(caplog):
    model, (x, y) = fallback_model()
    with caplog.at_level(logging.WARNING, logger="lipdp.clipping.fast_norms"):
        clip_lib.per_example_gradient_norms(model, x, y)
        clip_lib.per_example_gradient_norms(model, x, y)
    messages = [r.getMessage() for r in caplog.records if r.name == "lipdp.clipping.fast_norms"]
    assert sum("'prelu'" in m for m in messages) == 1
    assert sum("'shared_dense'" in m and "more than once" in m for m in messages) == 1
    assert len(messages) == 2  # the other Dense layers have a fast rule


@pytest.mark.parametrize("name", [n for n in MODELS if n != "fallback"])
def test_every_trainable_layer_of_these_models_gets_a_fast_rule(name):
    """So that the norm tests above check the rules, not the per-example fallback."""
    model, _ = MODELS[name]()
    registry = clip_lib.make_layer_registry()
    layers = [layer for layer, _ in lipdp.backend.leaf_layer_calls(model) if layer.trainable_variables]
    assert [layer.name for layer in layers if not clip_lib.layer_rules.has_fast_rule(layer, registry)] == []


# -- lipdp's fast rules, layer by layer ---------------------------------------------------
def loop_squared_norms(layer, x, cotangent):
    """``||d<z_i, c_i>/dtheta||^2`` for each example ``i``, one GradientTape per example (no fast rule)."""
    squared = []
    for xi, ci in zip(x, cotangent):
        with tf.GradientTape() as tape:
            target = tf.reduce_sum(layer(xi[None]) * ci[None])
        grads = tape.gradient(target, layer.trainable_variables)  # Embedding: IndexedSlices, rows summed below
        squared.append(sum(np.sum(np.square(tf.convert_to_tensor(g).numpy().astype(np.float64))) for g in grads))
    return np.array(squared)


def rule_squared_norms(layer, x, method="auto", seed=0):
    """(the registry rule's squared norms, the loop's) for a random cotangent of the layer's output."""
    with tf.GradientTape() as tape:
        base, _, squared_norms = clip_lib.make_layer_registry(method)[type(layer)](layer, (x,), {}, tape)
    cotangent = np.random.default_rng(seed).normal(size=base.shape).astype("float32")
    return squared_norms(tf.constant(cotangent)).numpy(), loop_squared_norms(layer, x, cotangent)


def built(layer, shape, seed=0):
    """``layer`` built on a random ``(batch, *shape)`` input, with random (non-default) variables too."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    layer(x)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(size=variable.shape))
    return layer, x


KERNEL_LAYERS = {
    "dense": lambda: built(K.Dense(4), (6, 5)),
    "dense-no-bias-seq": lambda: built(K.Dense(4, use_bias=False), (6, 7, 5)),
    "dense-seq": lambda: built(K.Dense(4), (6, 7, 5)),
    "dense-rank4": lambda: built(K.Dense(3), (5, 2, 3, 4)),
    "lipschitz-dense-seq": lambda: built(L.LipschitzDense(4, bias_bound=1.0), (6, 7, 5)),
    "einsum": lambda: built(K.EinsumDense("ab,bc->ac", output_shape=4, bias_axes="c"), (6, 5)),
    "einsum-seq": lambda: built(K.EinsumDense("abc,cd->abd", output_shape=(7, 4), bias_axes="d"), (6, 7, 5)),
    "einsum-ellipsis": lambda: built(K.EinsumDense("...b,bc->...c", output_shape=4, bias_axes="c"), (6, 7, 5)),
    "einsum-two-produced": lambda: built(K.EinsumDense("abc,cde->abde", (7, 2, 3), bias_axes="e"), (6, 7, 5)),
    "einsum-two-contracted": lambda: built(K.EinsumDense("abcd,cde->abe", (7, 4), bias_axes="be"), (6, 7, 2, 3)),
    "einsum-blocks": lambda: built(K.EinsumDense("abnh,nhd->abnd", (7, 2, 3), bias_axes="nd"), (6, 7, 2, 4)),
    "einsum-summed-input": lambda: built(K.EinsumDense("abc,cd->ad", output_shape=4), (6, 7, 5)),
}


@pytest.mark.parametrize("name", list(KERNEL_LAYERS))
@pytest.mark.parametrize("method", ["gram", "direct", "auto"])
def test_kernel_rules_match_a_loop_over_examples(name, method):
    layer, x = KERNEL_LAYERS[name]()
    fast, expected = rule_squared_norms(layer, x, method)
    np.testing.assert_allclose(fast, expected, rtol=1e-4)
    assert expected.min() > 0


@pytest.mark.parametrize(
    "shape, options",
    [
        ((6, 5), {}),
        ((6, 7, 5), {}),
        ((6, 7, 5), {"axis": [1, 2]}),
        ((6, 3, 4, 5), {"axis": [1, 3]}),
        ((6, 7, 5), {"center": False}),
        ((6, 7, 5), {"scale": False}),
    ],
)
def test_layer_norm_rule_matches_a_loop_over_examples(shape, options):
    layer, x = built(K.LayerNormalization(**options), shape)
    fast, expected = rule_squared_norms(layer, x)
    np.testing.assert_allclose(fast, expected, rtol=1e-4)
    assert expected.min() > 0


@pytest.mark.parametrize("shape", [(6,), (6, 9), (4, 3, 5)])
def test_embedding_rule_matches_a_loop_over_examples_with_repeated_indices(shape):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 4, shape).astype("int32")  # 4 rows: every example of 9 or 15 indices repeats some
    layer = K.Embedding(4, 3)
    layer(indices)
    layer.embeddings.assign(rng.normal(size=(4, 3)))
    fast, expected = rule_squared_norms(layer, indices)
    np.testing.assert_allclose(fast, expected, rtol=1e-4)
    assert expected.min() > 0


@pytest.mark.parametrize(
    "layer, shape",
    [
        (K.Dense(4), (0, 7, 5)),
        (K.EinsumDense("abnh,nhd->abnd", (7, 2, 3), bias_axes="nd"), (0, 7, 2, 4)),
        (K.LayerNormalization(), (0, 7, 5)),
    ],
)
def test_rules_on_an_empty_batch_give_no_norms(layer, shape):
    layer, x = built(layer, shape)
    fast, _ = rule_squared_norms(layer, x)
    assert fast.shape == (0,)


def test_embedding_rule_on_an_empty_batch_gives_no_norms():
    layer = K.Embedding(4, 3)
    fast, _ = rule_squared_norms(layer, np.zeros((0, 5), "int32"))
    assert fast.shape == (0,)


def test_clipped_norms_import_nothing_from_tensorflow_privacy():
    """A fresh interpreter in which importing tensorflow_privacy fails computes fast norms all the same."""
    script = """
import sys
sys.modules["tensorflow_privacy"] = None  # any import of it raises ImportError
import numpy as np
import tensorflow as tf
import lipdp
model = lipdp.DPSequential([tf.keras.Input((5,)), tf.keras.layers.Dense(3)], mechanism="flat")
model.compile("sgd", loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
x, y = np.ones((4, 5), "float32"), np.eye(3, dtype="float32")[[0, 1, 2, 0]]
assert lipdp.clipping.per_example_gradient_norms(model, x, y).shape == (4,)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# -- the functional-graph forward pass ----------------------------------------------------
@pytest.mark.parametrize("name", ["dense", "lipschitz", "mixed", "nested", "sequence"])
def test_graph_forward_pass_calls_each_layer_once_and_matches_the_model(name):
    """Sequential and functional models, a two-input Add and a nested model: same output, every layer call seen."""
    tf.keras.utils.set_random_seed(0)
    model, (x, _) = MODELS[name]()
    called = []

    def call_layer(layer, args, kwargs):
        called.append(layer)
        return layer(*args, **kwargs)

    outputs = lipdp.backend.run_layer_by_layer(model, x, call_layer)
    np.testing.assert_allclose(outputs.numpy(), model(x).numpy(), rtol=1e-6)
    assert called == [layer for layer, _ in lipdp.backend.leaf_layer_calls(model)]


# -- clipping rules --------------------------------------------------------------------
def huge_batch(model_input_dim=5, n=8):
    """Examples 0, 3 and 6 have gradients ~1e4 times larger than the others."""
    x, y = vectors(n=n, dim=model_input_dim, seed=2)
    x[[0, 3, 6]] *= 1e4
    return x, y


def small_model(rule, clip_norm=0.5, gamma=0.01):
    tf.keras.utils.set_random_seed(4)
    model = lipdp.DPSequential(
        [tf.keras.Input((5,)), K.Dense(6, activation="relu"), K.Dense(3)],
        mechanism={"name": rule, "clip_norm": clip_norm, "gamma": gamma},
    )
    return compiled(model)


@pytest.mark.parametrize("clipping", clip_lib.rule_names())
def test_each_example_contributes_at_most_the_sensitivity(clipping):
    """sum(batch) - sum(batch without j) is example j's contribution: its norm is at most S."""
    clip_norm = 5.0
    model = small_model(clipping, clip_norm=clip_norm)
    x, y = huge_batch()
    sensitivity_value = 1.0 if clipping == "automatic" else clip_norm
    assert lipdp.mechanisms.get({"name": clipping, "clip_norm": clip_norm}).sensitivity() == sensitivity_value

    def flat_sums(keep):
        _, _, sums, bounds = model.private_gradient_sums(x[keep], y[keep])
        return np.concatenate([g.numpy().ravel() for g in sums]).astype(np.float64), bounds

    everything = np.arange(len(x))
    total, bounds = flat_sums(everything)
    assert bounds.per_variable is None  # one whole-contribution sensitivity, no per-variable split
    assert float(bounds.total) == pytest.approx(sensitivity_value, rel=1e-12)
    norms = reference_norms(model, x, y)
    assert norms[[0, 3, 6]].min() > 1e3 * clip_norm and norms[[1, 2, 4, 5, 7]].max() < clip_norm  # both regimes
    contributions = []
    for j in everything:
        without, _ = flat_sums(everything[everything != j])
        contributions.append(np.linalg.norm(total - without))
    contributions = np.array(contributions)
    assert contributions.max() <= sensitivity_value, contributions  # the margin absorbs float32 rounding
    huge = contributions[[0, 3, 6]]
    if clipping == "flat":
        np.testing.assert_allclose(huge, clip_norm * (1 - clip_lib.CLIP_MARGIN), rtol=1e-5)  # clipped to R
        np.testing.assert_allclose(contributions[[1, 2]], norms[[1, 2]], rtol=1e-4)  # small ones untouched
    elif clipping == "automatic":
        np.testing.assert_allclose(huge, 1.0, rtol=1e-3)  # ||g|| / (||g|| + gamma) -> 1
        expected = (1 - clip_lib.CLIP_MARGIN) * norms[[1, 2]] / (norms[[1, 2]] + 0.01)  # the rule's target
        np.testing.assert_allclose(contributions[[1, 2]], expected, rtol=1e-4)
    elif clipping == "global":  # a rule added later gets the generic check above only
        np.testing.assert_allclose(huge, 0.0, atol=1e-5)  # dropped
        np.testing.assert_allclose(contributions[[1, 2]], norms[[1, 2]], rtol=1e-4)  # kept unchanged


def test_fallback_layer_with_dropout_contributes_at_most_the_clip_norm():
    """Dropout inside a fallback layer draws new masks when run again per example.

    The clipped sum used to come from the forward pass (one mask) while the
    norm was measured on a recomputation (another mask): 1.4-2.2 x the clip
    norm in half of the trials. A batch of one example: the sum is its contribution.
    """
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((4, 6))
    attention = K.MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.5)(inp, inp)
    model = compiled(
        lipdp.DPModel(inp, K.Dense(3)(K.Flatten()(attention)), mechanism={"name": "flat", "clip_norm": 0.01})
    )
    x = np.random.default_rng(0).normal(size=(1, 4, 6)).astype("float32") * 5
    y = np.eye(3, dtype="float32")[[1]]
    contributions = []
    for _ in range(30):
        _, _, sums, _ = model.private_gradient_sums(x, y)
        contributions.append(np.linalg.norm(np.concatenate([g.numpy().ravel() for g in sums]).astype(np.float64)))
    assert max(contributions) <= 0.01
    assert min(contributions) > 0.009  # the gradient is far above the clip norm: every trial is clipped


@pytest.mark.parametrize("clipping", clip_lib.rule_names())
def test_noise_std_is_sigma_times_sensitivity_under_both_allocations(clipping):
    x, y = vectors(n=200)
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=20)
    expected = 0.7 * (1.0 if clipping == "automatic" else 2.0)
    for allocation in lipdp.policy.NOISE_ALLOCATIONS:
        model = small_model(clipping, clip_norm=2.0)
        model.make_private(sampler, noise_multiplier=0.7, noise_allocation=allocation)
        stds = [
            float(s)
            for s in model.noise_stddevs(mechanisms.Sensitivity.of_whole_contribution(model.mechanism.sensitivity()))
        ]
        np.testing.assert_allclose(stds, expected, rtol=1e-12)


def test_epsilon_equals_the_clipless_one():
    x, y = vectors(n=240, dim=6)
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=24, seed=0)
    tf.keras.utils.set_random_seed(0)
    clipless = lipdp.DPSequential([tf.keras.Input((6,)), L.InputNormClip(1.0), L.LipschitzDense(3)])
    clipless.compile("sgd", loss=lipdp.losses.TauCategoricalCrossentropy(2.0))
    clipped = compiled(
        lipdp.DPSequential(
            [tf.keras.Input((6,)), K.Dense(8, activation="relu"), K.Dense(3)],
            mechanism={"name": "global", "clip_norm": 1.0},
        )
    )
    policies = [m.make_private(sampler, noise_multiplier=1.1, delta=1e-4) for m in (clipless, clipped)]
    assert policies[0] == policies[1]
    for model in (clipless, clipped):
        model.fit(sampler, epochs=1, verbose=0)
    assert int(clipped.privacy_steps) == int(clipless.privacy_steps) == sampler.steps_per_epoch
    assert clipped.epsilon() == clipless.epsilon() > 0
    assert np.all(np.isfinite(clipped.get_weights()[0]))
    assert "global per-example clipping" in clipped.privacy_statement()
    assert "certified per-sample gradient bounds" in clipless.privacy_statement()


def test_flat_clipping_matches_tensorflow_privacy_dp_sgd(monkeypatch):
    """Cross-check: same batch, same weights, same R: our noiseless step equals DPKerasSGDOptimizer's.

    Our PrivacyPolicy needs noise_multiplier > 0, so the model gets sigma = 1
    and its ``noise_stddevs`` is monkeypatched to zero (tf-privacy runs with
    noise_multiplier = 0). tf-privacy divides the clipped sum by
    num_microbatches (= batch size, one example per microbatch); ours by the
    expected batch size qN: the batch size is chosen equal to qN.
    """
    tensorflow_privacy = pytest.importorskip(
        "tensorflow_privacy", reason="tensorflow_privacy is not installed (optional: it pins TensorFlow <= 2.15)"
    )

    batch, clip_norm, lr = 16, 2.5, 0.5
    x, y = vectors(n=160, dim=5, seed=3)
    ours = lipdp.DPSequential(
        [tf.keras.Input((5,)), K.Dense(8, activation="tanh"), K.Dense(3)],
        mechanism={"name": "flat", "clip_norm": clip_norm},
    )
    ours.compile(tf.keras.optimizers.SGD(lr), loss=CE)
    theirs = tf.keras.Sequential([tf.keras.Input((5,)), K.Dense(8, activation="tanh"), K.Dense(3)])
    for theirs_variable, ours_variable in zip(theirs.trainable_variables, ours.trainable_variables):
        theirs_variable.assign(ours_variable)
    start = [v.numpy() for v in ours.trainable_variables]
    norms = reference_norms(ours, x[:batch], y[:batch])
    assert (norms > clip_norm).sum() >= 3 and (norms < clip_norm).sum() >= 3  # clipping matters

    ours.make_private(lipdp.PoissonSampler(x, y, expected_batch_size=batch), noise_multiplier=1.0)
    monkeypatch.setattr(
        ours, "noise_stddevs", lambda sensitivity: [tf.zeros((), tf.float64) for _ in ours.trainable_variables]
    )
    ours.allow_unaccounted_steps().train_on_batch(x[:batch], y[:batch])

    optimizer = tensorflow_privacy.DPKerasSGDOptimizer(
        l2_norm_clip=clip_norm * (1 - clip_lib.CLIP_MARGIN),
        noise_multiplier=0.0,
        num_microbatches=batch,
        learning_rate=lr,
    )
    per_example = tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    with tf.GradientTape() as tape:
        loss = per_example(y[:batch], theirs(x[:batch], training=True))
    optimizer.minimize(loss, theirs.trainable_variables, tape=tape)

    for a, b in zip(ours.trainable_variables, theirs.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6)
    # a real step was taken
    assert all(np.abs(a.numpy() - b).max() > 1e-4 for a, b in zip(ours.trainable_variables, start))


# -- set-up, validation, save/load -------------------------------------------------------
def test_validation_reports_every_problem_at_once():
    layers = [tf.keras.Input((3,)), K.Dense(4), K.BatchNormalization(), L.ClipGradient(0.1), K.Dense(2)]
    with pytest.raises(
        sensitivity.ModelNotSupportedError, match=r"2 problems: \(1\) .*batch statistics.*\(2\) .*clips"
    ):
        clip_lib.validate(compiled(lipdp.DPSequential(layers, mechanism="flat")))


def test_constructor_and_validation_errors():
    with pytest.raises(
        sensitivity.ModelNotSupportedError, match="unknown gradient mechanism 'adaptive'.*flat.*automatic.*global"
    ):
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2)], mechanism="adaptive")
    with pytest.raises(ValueError, match="clip_norm"):
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2)], mechanism={"name": "flat", "clip_norm": 0.0})
    x, y = vectors(n=50, dim=3, classes=2)
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=10)
    bn = compiled(
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(4), K.BatchNormalization(), K.Dense(2)], mechanism="flat")
    )
    with pytest.raises(sensitivity.ModelNotSupportedError, match="BatchNormalization"):
        bn.make_private(sampler, noise_multiplier=1.0)
    string_loss = compiled(
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2)], mechanism="flat"), loss="categorical_crossentropy"
    )
    with pytest.raises(sensitivity.ModelNotSupportedError, match="keras.losses.Loss"):
        string_loss.make_private(sampler, noise_multiplier=1.0)
    clip_gradient = compiled(
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2), L.ClipGradient(1.0)], mechanism="flat")
    )
    with pytest.raises(sensitivity.ModelNotSupportedError, match="custom gradient"):
        clip_gradient.make_private(sampler, noise_multiplier=1.0)
    # an ordinary Keras model is accepted with clipping, refused without (Lipschitz-only check)
    plain = compiled(lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2)], mechanism="automatic"))
    plain.make_private(sampler, noise_multiplier=1.0)
    clipless = compiled(
        lipdp.DPSequential([tf.keras.Input((3,)), K.Dense(2)]), loss=lipdp.losses.TauCategoricalCrossentropy()
    )
    with pytest.raises(sensitivity.ModelNotSupportedError, match="LipschitzDense"):
        clipless.make_private(sampler, noise_multiplier=1.0)


@pytest.mark.parametrize("strides, refused", [((1, 2), True), ((2, 1), True), ((2, 2), False)])
def test_a_plain_strided_pointwise_conv_is_refused_before_it_can_corrupt_memory(strides, refused):
    """oneDNN's Conv2DBackpropFilter corrupts the heap for a 1x1 kernel with strides (1, 2) on a batch of one."""
    x, y = images(n=20, size=6, channels=2, classes=3)
    layers = [tf.keras.Input((6, 6, 2)), K.Conv2D(3, 1, strides=strides), K.Flatten(), K.Dense(3)]
    model = compiled(lipdp.DPSequential(layers, mechanism="flat"))
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=5)
    if refused:
        with pytest.raises(sensitivity.ModelNotSupportedError, match=r"1x1 Conv2D with strides.*LipschitzConv2D"):
            model.make_private(sampler, noise_multiplier=1.0)
    else:
        model.make_private(sampler, noise_multiplier=1.0)
    lipschitz = [tf.keras.Input((6, 6, 2)), L.LipschitzConv2D(3, 1, strides=strides), K.Flatten(), K.Dense(3)]
    compiled(lipdp.DPSequential(lipschitz, mechanism="flat")).make_private(sampler, noise_multiplier=1.0)


@pytest.mark.parametrize("functional", [False, True])
def test_save_and_load_a_clipped_model(tmp_path, functional):
    x, y = images(n=60, size=6, channels=1, classes=3)
    tf.keras.utils.set_random_seed(5)
    if functional:
        inp = tf.keras.Input((6, 6, 1))
        h = K.Flatten()(K.Conv2D(3, 3, strides=2, activation="relu")(inp))
        model = lipdp.DPModel(inp, K.Dense(3)(h), mechanism={"name": "automatic", "gamma": 0.05}, noise_seed=2)
    else:
        model = lipdp.DPSequential(
            [tf.keras.Input((6, 6, 1)), K.Conv2D(3, 3, activation="relu"), K.Flatten(), K.Dense(3)],
            mechanism={"name": "global", "clip_norm": 2.5},
            noise_seed=2,
        )
    model.compile("adam", loss=CE)
    sampler = lipdp.PoissonSampler(x, y, expected_batch_size=12, seed=0)
    model.make_private(sampler, noise_multiplier=1.0)
    model.fit(sampler, epochs=1, verbose=0)
    path = str(tmp_path / "clipped.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.mechanism.get_config() == model.mechanism.get_config()
    assert loaded.privacy == model.privacy
    assert loaded.epsilon() == pytest.approx(model.epsilon())
    np.testing.assert_allclose(loaded.predict(x[:10], verbose=0), model.predict(x[:10], verbose=0), atol=1e-6)
    loaded.fit(sampler, epochs=1, verbose=0)
    assert int(loaded.privacy_steps) == 2 * sampler.steps_per_epoch
    assert model.mechanism.describe() in loaded.privacy_statement()


def single_contributions(model, x, y):
    """Each example's contribution to the clipped sum: its sums alone minus an empty batch's (no noise is added)."""
    empty = model.private_gradient_sums(x[:0], y[:0])[2]
    norms = []
    for i in range(len(x)):
        alone = model.private_gradient_sums(x[i : i + 1], y[i : i + 1])[2]
        norms.append(np.sqrt(sum(float(tf.reduce_sum(tf.square(a - b))) for a, b in zip(alone, empty))))
    return np.array(norms)


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_norm_far_from_zero_contributes_at_most_the_clip_norm(axis):
    """Inputs at 1e7 +- 1: Keras' fused normalisation and a recomputed one differed by float32 cancellation (1.47 R)."""
    model = compiled(
        lipdp.DPSequential(
            [tf.keras.Input((3, 8)), K.LayerNormalization(axis=axis, center=False), K.Flatten()],
            mechanism={"name": "flat", "clip_norm": 1e-3},
        ),
        loss=tf.keras.losses.MeanSquaredError(),
    )
    rng = np.random.default_rng(0)
    x = tf.constant((1e7 + rng.normal(size=(8, 3, 8))).astype("float32"))
    y = tf.constant(rng.normal(size=(8, 24)).astype("float32"))
    assert single_contributions(model, x, y).max() <= 1e-3


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_gram_form_with_cancelling_positions_contributes_at_most_the_clip_norm(kind):
    """Two nearly equal positions, opposite read-out weights: the float32 Gram form under-stated the norm (1.35 R)."""
    rng = np.random.default_rng(0)
    shape, first = (
        ((2, 64), K.Dense(64, use_bias=False)) if kind == "dense" else ((1, 2, 64), K.Conv2D(64, 1, use_bias=False))
    )
    inputs = tf.keras.Input(shape)
    readout = K.Dense(1, use_bias=False)
    model = compiled(
        lipdp.DPModel(inputs, readout(K.Flatten()(first(inputs))), mechanism={"name": "flat", "clip_norm": 1e-3}),
        loss=tf.keras.losses.MeanSquaredError(),
    )
    first.kernel.assign(1e-4 * rng.normal(size=first.kernel.shape).astype("float32"))
    v = rng.normal(size=64).astype("float32")
    readout.kernel.assign(np.concatenate([v, -v * (1 + 1e-4)])[:, None])
    h = rng.normal(size=(8, 1, 64)).astype("float32") * 100
    x = np.concatenate([h, h + 1e-3 * rng.normal(size=h.shape).astype("float32")], axis=1).reshape((8,) + shape)
    y = rng.normal(size=(8, 1)).astype("float32")
    assert clip_lib.layer_rules._cheaper_form(2, 64, 64) == "gram"
    assert single_contributions(model, tf.constant(x), tf.constant(y)).max() <= 1e-3


def test_a_variable_read_by_another_layer_is_refused():
    """A tied embedding read again by a matmul: its rule saw one path of two (1.72 R measured)."""
    inputs = tf.keras.Input((4,), dtype="int32")
    embedding = K.Embedding(6, 3)
    logits = tf.matmul(K.Dense(3)(embedding(inputs)), embedding.embeddings, transpose_b=True)
    model = compiled(
        lipdp.DPModel(inputs, logits, mechanism={"name": "flat", "clip_norm": 1e-3}),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(sensitivity.ModelNotSupportedError, match="tied weights.*embeddings"):
        model.mechanism.validate(model)
