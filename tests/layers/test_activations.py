"""GroupSort, FullSort, ReLU, Abs (lipdp/layers/activations.py): bounds against independent computations."""

import numpy as np
import pytest
import tensorflow as tf
from layer_checks import f64, jacobian_matrices, norms

import lipdp.layers as L
from lipdp import losses, verification

ACTIVATIONS = {
    "groupsort2": lambda: L.GroupSort(2),
    "groupsort4": lambda: L.GroupSort(4),
    "fullsort": L.FullSort,
    "relu": L.ReLU,
    "abs": L.Abs,
}


def _numpy_activation(name, x):
    if name == "relu":
        return np.maximum(x, 0)
    if name == "abs":
        return np.abs(x)
    if name == "groupsort2":  # channel i is paired with channel i + C/2
        first, second = np.split(x, 2, axis=-1)
        return np.concatenate([np.minimum(first, second), np.maximum(first, second)], axis=-1)
    group = {"groupsort4": 4, "fullsort": x.shape[-1]}[name]
    return np.sort(x.reshape(x.shape[:-1] + (-1, group)), axis=-1).reshape(x.shape)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 4)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_bounds_and_jacobian(name, shape):
    layer = ACTIVATIONS[name]()
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(size=(4,) + shape) * 3, -np.abs(rng.normal(size=(1,) + shape))]).astype("float32")
    out = layer(x).numpy()
    np.testing.assert_allclose(out, _numpy_activation(name, x), atol=0)
    bound = float(layer.output_bound(f64(1.0)))
    assert bound == 1.0 and float(layer.lipschitz_constant()) == 1.0
    assert float(layer.input_cotangent_bound(f64(2.5))) == 2.5
    assert layer.gradient_bounds(f64(1.0), f64(1.0)) == [] and not layer.trainable_variables
    assert np.all(norms(out) <= norms(x) * (1 + 1e-6))
    for jac in jacobian_matrices(layer, x):
        op = np.linalg.norm(jac, 2)
        assert op <= 1 + 1e-6
        if name in ("groupsort2", "groupsort4", "fullsort", "abs"):
            np.testing.assert_allclose(jac.T @ jac, np.eye(jac.shape[1]), atol=1e-6)  # (signed) permutation
    if name != "relu":
        np.testing.assert_allclose(norms(out), norms(x), rtol=1e-6)


@pytest.mark.parametrize("name", ["groupsort2", "groupsort4", "fullsort"])
def test_sorting_backward_pass_is_a_permutation_at_exact_ties(name):
    """At ties tf.minimum/tf.maximum both route their cotangent to one input (norm sqrt 2)."""
    layer = ACTIVATIONS[name]()
    tied = np.array(
        [[0.5] * 8, [0.5, -1, 2, 0.5, 0.5, -1, 2, 0.5], [0.0] * 8, [1, 1, 1, 1, -3, -3, -3, -3]], dtype="float32"
    )
    for jac in jacobian_matrices(layer, tied):
        np.testing.assert_array_equal(jac.T @ jac, np.eye(8))


def test_groupsort_tie_does_not_break_the_kernel_bound():
    """The review's reproduction: identity kernel, tied pre-activations, ratio was sqrt 2."""
    model = tf.keras.Sequential(
        [tf.keras.Input((2,)), L.InputNormClip(1.0), L.LipschitzDense(2), L.GroupSort(), L.LipschitzDense(2)]
    )
    model.compile(loss=losses.TauCategoricalCrossentropy(100.0))
    model.layers[1].kernel.assign(np.eye(2))
    model.layers[3].kernel.assign(np.diag([1.0, -1.0]))
    x = np.array([[0.70710677, 0.70710677]], "float32")
    result = verification.verify_bounds(model, x, np.array([[0.0, 1.0]], "float32"), rtol=0)
    assert not result.violations
    assert result.max_ratio > 0.999  # attained up to the rounding margins: the check is not vacuous


def test_groupsort_refuses_bad_groups():
    with pytest.raises(ValueError):
        L.GroupSort(3)(tf.zeros((1, 4)))
    with pytest.raises(ValueError):
        L.GroupSort(0)
