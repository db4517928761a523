"""Memory-mapped feature caches are read in blocks and gathered per batch, never copied whole (lipdp.streaming)."""

import hashlib
import json
import os

import numpy as np
import pytest

from lipdp import cli, sampling, streaming
from lipdp import layers as L
from lipdp.layers.frontends import array_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


@pytest.fixture
def mapped(tmp_path, monkeypatch):
    """A (50, 4, 3) float32 array and its read-only memory map, with blocks of 7 rows."""
    x = np.random.default_rng(0).normal(size=(50, 4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 7 * 4 * 3 * 4)
    return x, np.load(tmp_path / "x.npy", mmap_mode="r")


def test_gathers_and_blocks_read_the_map_without_changing_it(mapped):
    x, view = mapped
    assert streaming.block_rows(view) == 7
    indices = np.array([44, 3, 3, 17, 0, 28, 41, 8, 9, 10])  # unsorted, repeated, over two blocks
    taken = streaming.take_rows(view[5:], indices)
    np.testing.assert_array_equal(taken, x[5:][indices])
    assert streaming.read_only_mapping(taken) is None  # the batch is in memory, one copy
    blocks = list(streaming.row_blocks(np.asarray(view[:-1])))
    assert [len(b) for b in blocks] == [7] * 7
    np.testing.assert_array_equal(np.concatenate(blocks), x[:-1])
    streaming.release_pages(view)
    np.testing.assert_array_equal(view, x)  # the pages are read again from the file


def test_only_read_only_file_maps_are_released(tmp_path, mapped):
    x, view = mapped
    assert streaming.read_only_mapping(np.asarray(view[3:9])) is not None  # a view of a view: the same file
    assert streaming.read_only_mapping(x) is None
    assert streaming.read_only_mapping(np.load(tmp_path / "x.npy", mmap_mode="c")) is None  # private changes kept
    private = np.load(tmp_path / "x.npy", mmap_mode="c")
    private[0] = 7.0
    streaming.release_pages(private)
    assert np.all(private[0] == 7.0)


def test_fingerprints_and_checks_read_in_blocks_give_the_whole_array_answer(mapped):
    """The cache keys and resume records of existing runs stay valid: the hash of all the bytes at once."""
    x, view = mapped
    whole = hashlib.sha256(str((x.shape, x.dtype.str)).encode() + x.tobytes()).hexdigest()[:32]
    assert array_fingerprint(view) == array_fingerprint(x) == whole
    assert (
        array_fingerprint(x[::2])
        == hashlib.sha256(
            str((x[::2].shape, x.dtype.str)).encode() + np.ascontiguousarray(x[::2]).tobytes()
        ).hexdigest()[:32]
    )
    broken = x.copy()
    broken[[2, 30, 31]] = np.nan
    with pytest.raises(ValueError, match=r"\(3 record"):
        sampling.check_finite("x", broken)
    sampling.check_finite("x", view)


def test_validation_batches_hold_every_row_once_in_order(mapped):
    x, view = mapped
    y = np.eye(5, dtype="float32")[np.arange(50) % 5]
    batches = list(sampling.array_dataset(view, y, 16).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_a_training_run_samples_from_the_cache_file_and_standardises_per_batch(tmp_path, monkeypatch):
    """The sampler gets the memory-mapped cache (no copy of the features, standardised or not); the release the
    head's ChannelStandardization carries is composed once."""
    seen = {}

    def spy(kind, x, y, **kwargs):
        seen["sampler"] = make_sampler(kind, x, y, **kwargs)
        return seen["sampler"]

    make_sampler = sampling.make_sampler
    monkeypatch.setattr(sampling, "make_sampler", spy)
    out = tmp_path / "run"
    overrides = [
        "model.frontend={type: Scattering2D, J: 1, L: 4}",
        "model.feature_statistics={noise_multiplier: 20, clip_norm: 8}",
        "training.epochs=1",
        f"dataset.feature_cache={tmp_path / 'cache'}",
    ]
    args = ["train", DIGITS, "--out", str(out), "--verbose", "0"] + [a for s in overrides for a in ("--set", s)]
    assert cli.main(args) == 0
    (cache,) = [name for name in os.listdir(tmp_path / "cache") if len(np.load(tmp_path / "cache" / name)) > 1000]
    mapping = streaming.read_only_mapping(seen["sampler"].x)
    assert mapping is not None and len(mapping) == os.path.getsize(tmp_path / "cache" / cache)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["release_noise_multipliers"] == [20.0]  # once: carried by the layer, not also passed as releases=
    assert isinstance(L.cached_features(L.Scattering2D(J=1, L=4), np.zeros((2, 8, 8, 1), "float32")), np.ndarray)
