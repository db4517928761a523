"""L2NormPooling2D, MaxPooling2D, GlobalL2NormPooling2D (lipdp/layers/pooling.py) against independent references."""

import math

import numpy as np
import pytest
from layer_checks import RTOL, expected_overlap, f64, jacobian_matrices, norms, tightness

import lipdp.layers as L

# (pool_size, strides, padding, input shape)
POOL_CASES = [
    (2, None, "valid", (6, 6, 2)),
    (2, None, "same", (5, 5, 2)),
    (3, 2, "same", (7, 7, 1)),
    (3, 1, "valid", (6, 6, 2)),
    ((2, 3), (1, 2), "same", (5, 7, 2)),
    (3, 3, "same", (7, 8, 1)),
    (2, 3, "valid", (7, 7, 1)),
    (3, 2, "valid", (7, 6, 1)),
]
POOL_IDS = [f"p{c[0]}-s{c[1]}-{c[2]}-{'x'.join(map(str, c[3]))}".replace(" ", "") for c in POOL_CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def numpy_pool(x, pool, strides, padding, kind):
    """Reference window pooling: zero padding (l2) / ignored padding (max), TF 'same' placement."""
    (kh, kw), (sh, sw) = _pair(pool), _pair(strides if strides is not None else pool)
    b, h, w, c = x.shape
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + kh - h, 0), max((ow - 1) * sw + kw - w, 0)
        top, left = ph // 2, pw // 2
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        top = left = 0
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * sh - top, j * sw - left
            rows = slice(max(r0, 0), min(r0 + kh, h))
            cols = slice(max(c0, 0), min(c0 + kw, w))
            window = x[:, rows, cols, :].astype(np.float64)
            if kind == "l2":
                out[:, i, j, :] = np.sqrt(np.square(window).sum(axis=(1, 2)))
            else:
                out[:, i, j, :] = window.max(axis=(1, 2))
    return out


def _delta_images(shape):
    n = math.prod(shape)
    return np.eye(n, dtype=np.float32).reshape((n,) + shape)


@pytest.mark.parametrize("kind", ["l2", "max"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_pooling_matches_reference_and_bounds(case, kind):
    pool, strides, padding, shape = case
    cls = L.L2NormPooling2D if kind == "l2" else L.MaxPooling2D
    layer = cls(pool_size=pool, strides=strides, padding=padding)
    overlap = expected_overlap(pool, strides if strides is not None else pool)
    assert layer.overlap == overlap
    assert float(layer.lipschitz_constant()) == pytest.approx(math.sqrt(overlap))
    assert layer.gradient_bounds(f64(1.0), f64(1.0)) == []

    rng = np.random.default_rng(11)
    x = np.concatenate(
        [rng.normal(size=(4,) + shape), -np.abs(rng.normal(size=(1,) + shape)), np.ones((1,) + shape)]
    ).astype("float32")
    out = layer(x).numpy()
    atol = 1e-5 if kind == "l2" else 0
    np.testing.assert_allclose(out, numpy_pool(x, pool, strides, padding, kind), atol=atol, rtol=1e-5)

    # output bound: random inputs and single pixels (a pixel in `overlap` windows attains sqrt(overlap))
    candidates = np.concatenate([x, _delta_images(shape) * 2.0])
    ratio = norms(layer(candidates)) / (float(layer.output_bound(f64(1.0))) * norms(candidates))
    assert ratio.max() <= 1 + RTOL
    tightness(f"{kind} pool {case} output / output_bound", ratio.max())
    assert ratio.max() == pytest.approx(1.0, abs=1e-4)  # every case has a pixel in `overlap` windows

    # Jacobian operator norm, at random points and at a spike (max pooling: one big pixel wins all its windows)
    spikes = _delta_images(shape)[rng.choice(math.prod(shape), 3, replace=False)] * 10
    points = np.concatenate([x[:4], spikes + rng.normal(size=spikes.shape).astype("float32") * 0.01])
    ops = [np.linalg.norm(j, 2) for j in jacobian_matrices(layer, points)]
    lip = float(layer.lipschitz_constant())
    assert max(ops) <= lip * (1 + RTOL)
    tightness(f"{kind} pool {case} jacobian / lipschitz_constant", max(ops) / lip)


def test_l2_norm_pooling_same_padding_is_exact_at_borders():
    """Border windows hold fewer pixels: the l2 norm of what is there, never a rescaled average."""
    layer = L.L2NormPooling2D(pool_size=3, strides=2, padding="same")
    x = np.ones((1, 4, 4, 1), np.float32)
    out = layer(x).numpy()[0, :, :, 0]
    # TF 'same': 2 outputs per axis, total padding 1, put after: windows rows {0,1,2}, {2,3}
    np.testing.assert_allclose(out, np.sqrt([[9.0, 6.0], [6.0, 4.0]]), rtol=1e-6)
    assert np.linalg.norm(out) <= float(layer.output_bound(f64(np.linalg.norm(x)))) * (1 + RTOL)


def test_global_l2_norm_pooling():
    layer = L.GlobalL2NormPooling2D()
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.normal(size=(3, 4, 5, 3)), np.zeros((1, 4, 5, 3))]).astype("float32")
    out = layer(x).numpy()
    reference = np.sqrt(np.square(x.astype(np.float64)).sum(axis=(1, 2)))
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert np.all(norms(out) <= norms(x) * (1 + 1e-6))
    assert float(layer.output_bound(f64(2.0))) == 2.0 and float(layer.lipschitz_constant()) == 1.0
    ops = [np.linalg.norm(j, 2) for j in jacobian_matrices(layer, x)]
    assert max(ops) <= 1 + 1e-6
    assert np.all(np.isfinite(ops))  # differentiable at 0
    tightness("global l2 pool jacobian / lipschitz_constant", max(ops))
