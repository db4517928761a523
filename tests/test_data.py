"""Tests for lipdp.data: synthetic local files only (no network, no ../shared needed)."""

import gzip
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import lipdp
from lipdp import data
from lipdp.data import DataFormatError, Dataset, DataUnavailableError

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# ---------------------------------------------------------------------------------------
# helpers writing synthetic files
# ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_images(n: int, size: int = 28) -> np.ndarray:
    """Image i has pixel (0, 0) = i % 256 and pixel (1, 1) = 255, everything else 0."""
    x = np.zeros((n, size, size), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n) % 256
    x[:, 1, 1] = 255
    return x


def make_labels(n: int) -> np.ndarray:
    return ((np.arange(n) * 7) % 10).astype(np.uint8)


def write_mnist_dir(folder: Path, n_train: int, n_test: int, gz: bool, train=True):
    folder.mkdir(parents=True, exist_ok=True)
    if train:
        write_idx(folder / "train-images-idx3-ubyte", make_images(n_train), gz)
        write_idx(folder / "train-labels-idx1-ubyte", make_labels(n_train), gz)
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(n_test), gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", make_labels(n_test), gz)
    return folder


def assert_well_formed(ds: Dataset, input_shape, num_classes=10):
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.shape[1:] == input_shape
        assert y.shape == (len(x), num_classes)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)
        norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
        assert norms.max() <= ds.max_input_norm + 1e-5
    assert ds.input_shape == input_shape
    assert ds.num_classes == num_classes
    assert ds.max_input_norm == pytest.approx(math.sqrt(math.prod(input_shape)))


# ---------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_full_idx_layout(tmp_path, gz):
    folder = write_mnist_dir(tmp_path / "mnist", n_train=50, n_test=20, gz=gz)
    ds = data.load_mnist(data_dir=folder)
    assert ds.name == "mnist"
    assert len(ds.x_train) == 50 and len(ds.x_test) == 20
    assert_well_formed(ds, (28, 28, 1))
    assert ds.max_input_norm == 28.0
    # values scaled by 1/255, labels converted to the right one-hot column
    np.testing.assert_allclose(ds.x_train[:, 0, 0, 0], (np.arange(50) % 256) / 255.0, rtol=1e-6)
    assert np.all(ds.x_train[:, 1, 1, 0] == 1.0)
    np.testing.assert_array_equal(ds.y_train.argmax(1), make_labels(50))
    np.testing.assert_array_equal(ds.y_test.argmax(1), make_labels(20))
    assert "official train/test" in ds.source and str(folder) in ds.source


def test_mnist_t10k_only_splits_8000_2000_in_order(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    # mixed compression: images gzipped, labels plain
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(10_000), gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", make_labels(10_000), gz=False)
    ds = data.load("mnist", data_dir=folder)
    assert len(ds.x_train) == 8000 and len(ds.x_test) == 2000
    assert_well_formed(ds, (28, 28, 1))
    labels = make_labels(10_000)
    np.testing.assert_array_equal(ds.y_train.argmax(1), labels[:8000])
    np.testing.assert_array_equal(ds.y_test.argmax(1), labels[8000:])
    # first test image is image 8000 (8000 % 256 = 64)
    assert ds.x_test[0, 0, 0, 0] == pytest.approx(64 / 255.0)
    assert "8000 train / 2000 test" in ds.source
    assert "test set" in ds.source and "t10k-images-idx3-ubyte.gz" in ds.source


@pytest.mark.parametrize("split, n_train", [(None, 80), (0.5, 50), (30, 30)])
def test_t10k_only_split_argument(tmp_path, split, n_train):
    folder = write_mnist_dir(tmp_path / "m", 0, 100, gz=False, train=False)
    ds = data.load_mnist(data_dir=folder, split=split)
    assert len(ds.x_train) == n_train and len(ds.x_test) == 100 - n_train
    assert f"{n_train} train / {100 - n_train} test" in ds.source


@pytest.mark.parametrize("split", [0, 100, 1.0, -3, True])
def test_t10k_only_rejects_empty_split(tmp_path, split):
    folder = write_mnist_dir(tmp_path / "m", 0, 100, gz=False, train=False)
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(data_dir=folder, split=split)


def test_split_ignored_with_warning_for_full_layout(tmp_path):
    folder = write_mnist_dir(tmp_path / "m", 30, 10, gz=False)
    with pytest.warns(UserWarning, match="ignored"):
        ds = data.load_mnist(data_dir=folder, split=5)
    assert len(ds.x_train) == 30


def test_idx_alternative_dot_names(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_idx(folder / "t10k-images.idx3-ubyte", make_images(10), gz=False)
    write_idx(folder / "t10k-labels.idx1-ubyte", make_labels(10), gz=False)
    assert len(data.load_mnist(data_dir=folder).x_train) == 8


def test_fashion_mnist_idx(tmp_path):
    folder = write_mnist_dir(tmp_path / "fashion", 12, 6, gz=True)
    ds = data.load("fashion-mnist", data_dir=folder)
    assert ds.name == "fashion_mnist" and "Fashion-MNIST" in ds.source
    assert_well_formed(ds, (28, 28, 1))


def test_mnist_npz_in_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (15, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 15).astype(np.uint8),
        x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 5).astype(np.uint8),
    )
    ds = data.load_mnist(data_dir=tmp_path)
    assert len(ds.x_train) == 15 and len(ds.x_test) == 5
    assert_well_formed(ds, (28, 28, 1))
    assert "mnist.npz" in ds.source
    # the npz path itself is accepted too
    assert len(data.load_mnist(data_dir=tmp_path / "mnist.npz").x_test) == 5


def test_missing_files_raise_data_unavailable(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(10), gz=False)  # labels missing
    with pytest.raises(DataUnavailableError, match="t10k-labels"):
        data.load_mnist(data_dir=folder)
    with pytest.raises(DataUnavailableError, match="does not exist"):
        data.load_mnist(data_dir=tmp_path / "nope")


# ---------------------------------------------------------------------------------------
# corrupt IDX files
# ---------------------------------------------------------------------------------------


def _t10k_dir_with_bad_images(tmp_path, raw: bytes, gz_name=False) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    name = "t10k-images-idx3-ubyte" + (".gz" if gz_name else "")
    (folder / name).write_bytes(raw)
    write_idx(folder / "t10k-labels-idx1-ubyte", make_labels(10), gz=False)
    return folder


def test_corrupt_idx_bad_magic(tmp_path):
    raw = bytearray(idx_bytes(make_images(10)))
    raw[0:4] = b"\x12\x34\x08\x03"
    folder = _t10k_dir_with_bad_images(tmp_path, bytes(raw))
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.*magic number 0x12340803"):
        data.load_mnist(data_dir=folder)


def test_corrupt_idx_wrong_ndim(tmp_path):
    # a labels file (1-D, magic 0x801) where an images file is expected
    folder = _t10k_dir_with_bad_images(tmp_path, idx_bytes(make_labels(10)))
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.*0x00000803"):
        data.load_mnist(data_dir=folder)


def test_corrupt_idx_truncated(tmp_path):
    raw = idx_bytes(make_images(10))[:-100]
    folder = _t10k_dir_with_bad_images(tmp_path, raw)
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.*truncated"):
        data.load_mnist(data_dir=folder)


def test_corrupt_gzip(tmp_path):
    folder = _t10k_dir_with_bad_images(tmp_path, b"this is not gzip data", gz_name=True)
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte\.gz"):
        data.load_mnist(data_dir=folder)


def test_idx_image_label_count_mismatch(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(10), gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", make_labels(9), gz=False)
    with pytest.raises(DataFormatError, match="10 images.*9 labels"):
        data.load_mnist(data_dir=folder)


def test_idx_labels_out_of_range(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    labels = make_labels(10)
    labels[3] = 12
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(10), gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(ValueError, match=r"y_train.*outside \[0, 9\]"):
        data.load_mnist(data_dir=folder)


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "a-idx3-ubyte", arr, gz=True)
    np.testing.assert_array_equal(data.read_idx(p), arr)


# ---------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------


def _cifar_batch(n: int, offset: int) -> dict:
    rows = np.empty((n, 3072), dtype=np.uint8)
    rows[:, :1024] = 10  # red plane
    rows[:, 1024:2048] = 20  # green plane
    rows[:, 2048:] = 30  # blue plane
    rows[:, 0] = 255  # red value of pixel (0, 0)
    return {
        b"batch_label": b"synthetic",
        b"labels": [int((offset + i) % 10) for i in range(n)],
        b"data": rows,
        b"filenames": [b"x.png"] * n,
    }


def write_cifar(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(n, k * n), f, protocol=2)
    return folder


def test_cifar10_python_batches_in_subfolder(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", n=4)
    ds = data.load("cifar10", data_dir=tmp_path)
    assert len(ds.x_train) == 20 and len(ds.x_test) == 4
    assert_well_formed(ds, (32, 32, 3))
    assert ds.max_input_norm == pytest.approx(math.sqrt(3072))
    # channel-major rows converted to NHWC
    np.testing.assert_allclose(ds.x_train[0, 5, 7], [10 / 255, 20 / 255, 30 / 255], rtol=1e-6)
    np.testing.assert_allclose(ds.x_train[:, 0, 0, 0], 1.0)
    np.testing.assert_array_equal(ds.y_train.argmax(1), np.arange(20) % 10)
    np.testing.assert_array_equal(ds.y_test.argmax(1), np.arange(20, 24) % 10)
    assert "python batches" in ds.source


def test_cifar10_batches_directly_in_data_dir(tmp_path):
    folder = write_cifar(tmp_path / "flat", n=2)
    ds = data.load_cifar10(data_dir=folder)
    assert len(ds.x_train) == 10 and len(ds.x_test) == 2


def test_cifar10_refuses_malicious_pickle(tmp_path):
    folder = write_cifar(tmp_path / "c", n=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataFormatError, match="test_batch.*refusing"):
        data.load_cifar10(data_dir=folder)


def test_cifar10_npz_and_missing(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "cifar10.npz",
        x_train=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, (6, 1)).astype(np.uint8),  # keras layout (N, 1)
        x_test=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, (3, 1)).astype(np.uint8),
    )
    ds = data.load_cifar10(data_dir=tmp_path)
    assert_well_formed(ds, (32, 32, 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError, match="data_batch_1"):
        data.load_cifar10(data_dir=empty)


# ---------------------------------------------------------------------------------------
# generic npz + preprocessing validation
# ---------------------------------------------------------------------------------------


def test_npz_integer_labels_uint8_images(tmp_path):
    p = tmp_path / "toy.npz"
    np.savez(
        p,
        x_train=np.array([[[0, 255], [51, 102]]] * 3, dtype=np.uint8),
        y_train=np.array([0, 1, 2]),
        x_test=np.array([[[255, 255], [0, 0]]], dtype=np.uint8),
        y_test=np.array([3]),
    )
    ds = data.load("npz", data_dir=p)
    assert ds.name == "toy" and ds.num_classes == 4  # inferred from max label over both
    assert_well_formed(ds, (2, 2, 1), num_classes=4)
    np.testing.assert_allclose(ds.x_train[0, :, :, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    assert ds.max_input_norm == 2.0


def test_npz_one_hot_labels_float_vectors(tmp_path):
    p = tmp_path / "vec.npz"
    y_train = np.eye(3)[[0, 2, 1, 1]]
    np.savez(
        p,
        x_train=np.full((4, 5), 0.5),
        y_train=y_train,
        x_test=np.zeros((2, 5)),
        y_test=np.eye(3)[[2, 0]],
    )
    ds = data.load_npz(p, name="vectors")
    assert ds.name == "vectors" and ds.num_classes == 3
    assert_well_formed(ds, (5,), num_classes=3)
    np.testing.assert_array_equal(ds.y_train, y_train)
    assert ds.max_input_norm == pytest.approx(math.sqrt(5))


def _save(p, **over):
    arrays = dict(
        x_train=np.full((4, 3), 0.5, dtype=np.float32),
        y_train=np.array([0, 1, 0, 1]),
        x_test=np.zeros((2, 3), dtype=np.float32),
        y_test=np.array([1, 0]),
    )
    arrays.update(over)
    np.savez(p, **arrays)
    return p


def test_npz_nan_input_raises_naming_array(tmp_path):
    x = np.full((4, 3), 0.5, dtype=np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="x_train.*non-finite"):
        data.load_npz(_save(tmp_path / "a.npz", x_train=x))
    x_test = np.zeros((2, 3))
    x_test[0, 0] = np.inf
    with pytest.raises(ValueError, match="x_test.*non-finite"):
        data.load_npz(_save(tmp_path / "b.npz", x_test=x_test))


@pytest.mark.parametrize(
    "override, pattern",
    [
        (dict(x_train=np.full((4, 3), 2.0)), r"x_train.*\[0, 1\]"),
        (dict(x_train=np.full((4, 3), -1, dtype=np.int16)), r"x_train.*\[0, 255\]"),
        (dict(y_test=np.array([1.5, 0.0])), "y_test.*non-integer"),
        (dict(y_train=np.array([0, 1, -1, 1])), r"y_train.*outside"),
        (dict(y_train=np.array([[0.5, 0.5]] * 4), y_test=np.eye(2)), "y_train.*not one-hot"),
        (dict(y_train=np.array([0, 1, 0])), "x_train has 4 examples but y_train has 3"),
        (dict(y_test=np.array([np.nan, 1.0])), "y_test.*non-finite"),
    ],
)
def test_npz_invalid_arrays(tmp_path, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.load_npz(_save(tmp_path / "bad.npz", **override))


def test_npz_missing_key(tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, x_train=np.zeros((2, 2)), y_train=np.zeros(2))
    with pytest.raises(DataFormatError, match=r"missing array\(s\) \['x_test', 'y_test'\]"):
        data.load_npz(p)


def test_labels_to_one_hot_with_explicit_num_classes():
    y = data.labels_to_one_hot(np.array([[2], [0]]), 4, "y")
    np.testing.assert_array_equal(y, [[0, 0, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="one-hot width 3, expected 4"):
        data.labels_to_one_hot(np.eye(3), 4, "y")


def test_images_to_unit_float_custom_max_value():
    x = data.images_to_unit_float(np.array([[0, 8, 16]]), "x", max_value=16)
    np.testing.assert_allclose(x, [[0, 0.5, 1]])
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        data.images_to_unit_float(np.array([[17]]), "x", max_value=16)


def test_dataset_rejects_inconsistent_arrays():
    x = np.zeros((3, 2), np.float32)
    y = np.eye(2, dtype=np.float32)[[0, 1, 0]]
    with pytest.raises(ValueError, match="y_test"):
        Dataset("t", x, y, x[:2], y, 2, "synthetic")
    with pytest.raises(ValueError, match="input"):
        Dataset("t", x, y, np.zeros((3, 4), np.float32), y, 2, "synthetic")


# ---------------------------------------------------------------------------------------
# digits (real, bundled with scikit-learn)
# ---------------------------------------------------------------------------------------


def test_digits():
    ds = data.load_digits()
    assert len(ds.x_train) == 1437 and len(ds.x_test) == 360
    assert_well_formed(ds, (8, 8, 1))
    assert ds.max_input_norm == 8.0
    assert ds.x_train.max() == 1.0  # pixel value 16 maps to exactly 1
    # stratified: every class has 35-37 test images out of 360
    counts = ds.y_test.sum(0)
    assert counts.min() >= 35 and counts.max() <= 37
    assert "stratified" in ds.source and "1437 train / 360 test" in ds.source
    again = data.load("digits", seed=0)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    other = data.load_digits(seed=1)
    assert not np.array_equal(other.x_test, ds.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.0)


# ---------------------------------------------------------------------------------------
# downloads (monkeypatched: no network) and registry
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_tfds(monkeypatch):
    # None in sys.modules makes `import tensorflow_datasets` raise ImportError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def test_offline_download_raises_data_unavailable(monkeypatch, no_tfds):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(lipdp.keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataUnavailableError) as info:
        data.load("mnist")
    msg = str(info.value)
    assert "download failed" in msg and "URL fetch failure" in msg
    assert "data_dir" in msg and "--data-dir" in msg
    assert "t10k-images-idx3-ubyte" in msg and "mnist.npz" in msg


def test_cifar_offline_message_lists_batches(monkeypatch, no_tfds):
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(lipdp.keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataUnavailableError, match="data_batch_1.*test_batch"):
        data.load_cifar10()


def test_download_via_keras(monkeypatch, no_tfds):
    arrays = ((make_images(6), make_labels(6)), (make_images(3), make_labels(3)))
    monkeypatch.setattr(lipdp.keras.datasets.fashion_mnist, "load_data", lambda: arrays)
    ds = data.load_fashion_mnist()
    assert len(ds.x_train) == 6 and "keras.datasets.fashion_mnist" in ds.source
    assert_well_formed(ds, (28, 28, 1))


def test_download_prefers_tfds_when_importable(monkeypatch):
    calls = []
    fake = types.ModuleType("tensorflow_datasets")

    def fake_load(name, split, batch_size, as_supervised):
        calls.append(name)
        return [(make_images(5)[..., None], make_labels(5).astype(np.int64))] * 2

    fake.load = fake_load
    fake.as_numpy = lambda x: x
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = data.load_mnist()
    assert calls == ["mnist"] and "tensorflow_datasets" in ds.source
    assert_well_formed(ds, (28, 28, 1))


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar10, digits, fashion_mnist, mnist, npz"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load("npz")
    with pytest.raises(ValueError, match="takes no data_dir"):
        data.load("digits", data_dir=tmp_path)
    assert set(data.DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "npz"}


# ---------------------------------------------------------------------------------------
# real MNIST test set from ../shared (optional)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST test files not found at {SHARED_MNIST} (only present on the "
    "project's shared machines; a fresh clone has no ../shared)",
)
def test_real_mnist_t10k_from_shared():
    ds = data.load_mnist(data_dir=SHARED_MNIST)
    assert len(ds.x_train) == 8000 and len(ds.x_test) == 2000
    assert_well_formed(ds, (28, 28, 1))
    # the first labels of the official MNIST test set
    np.testing.assert_array_equal(ds.y_train[:10].argmax(1), [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert 0.11 < ds.x_train.mean() < 0.15  # MNIST mean intensity ~0.13
    assert ds.y_train.sum(0).min() > 600  # all ten digits well represented
    assert "8000 train / 2000 test" in ds.source and "test set" in ds.source


def test_validation_split_carves_the_training_data_and_drops_the_test_split():
    digits = data.load("digits")
    carved = data.validation_split(digits, 0.25)
    n_fit = len(digits.x_train) - round(0.25 * len(digits.x_train))
    np.testing.assert_array_equal(carved.x_train, digits.x_train[:n_fit])
    np.testing.assert_array_equal(carved.x_test, digits.x_train[n_fit:])
    assert "VALIDATION" in carved.source
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="validation fraction"):
            data.validation_split(digits, bad)
