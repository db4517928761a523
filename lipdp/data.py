"""Data sets for differentially private training of Lipschitz networks.

Every loader returns a :class:`Dataset` whose inputs are ``float32`` arrays with values
in ``[0, 1]`` and whose labels are ``float32`` one-hot rows. The preprocessing is shared
by all loaders (:func:`images_to_unit_float`, :func:`add_channel_axis`,
:func:`labels_to_one_hot`, :func:`check_finite`) and is the only place where the
values are bounded, so the bound below holds for every data set:

    Input norm bound. Each input ``x`` with ``d = prod(input_shape)`` entries in
    ``[0, 1]`` satisfies ``||x||_2 <= sqrt(d)`` (:attr:`Dataset.max_input_norm`):
    8.0 for digits (8x8x1), 28.0 for MNIST and Fashion-MNIST (28x28x1) and
    ``sqrt(3072) ~= 55.43`` for CIFAR-10 (32x32x3).

This is the bound the *preprocessing* guarantees. A DP model is free to clip its
inputs to a smaller bound of its own (and must account for the bound it actually uses);
:attr:`Dataset.max_input_norm` is only the largest norm an input can have after loading.

Sources:

* ``digits``: scikit-learn's bundled copy of the UCI hand-written digits (no network).
* ``mnist`` / ``fashion_mnist`` / ``cifar10``: local files when ``data_dir`` is given
  (IDX files, CIFAR "python version" batches, or a ``.npz`` in the ``keras.datasets``
  layout), otherwise a download through ``tensorflow_datasets`` (when installed) or
  ``keras.datasets``. An offline download raises :class:`DataUnavailableError`
  explaining which local files to provide.
* ``npz``: any ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test``.

TensorFlow and ``tensorflow_datasets`` are imported lazily, only when a download is
attempted, so reading local files needs neither.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import warnings
import zlib
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from lipdp.backend import keras
from lipdp.errors import DataFormatError, DataUnavailableError

__all__ = [
    "Dataset",
    "DataUnavailableError",
    "DataFormatError",
    "load",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_npz",
    "read_idx",
    "check_finite",
    "images_to_unit_float",
    "add_channel_axis",
    "labels_to_one_hot",
    "DATASETS",
    "T10K_TRAIN_FRACTION",
]

PathLike = Union[str, "os.PathLike[str]"]
Split = Optional[Union[int, float]]

#: Fraction of the official 10,000-image test set used for training when only the
#: ``t10k`` files are available: the first 8,000 images train, the last 2,000 test.
T10K_TRAIN_FRACTION = 0.8


@dataclasses.dataclass(repr=False)
class Dataset:
    """A train/test data set with inputs in ``[0, 1]`` and one-hot labels.

    Attributes:
        name: Short name of the data set (e.g. ``"mnist"``).
        x_train: ``float32`` training inputs, ``NHWC`` images or ``N x d`` vectors,
            values in ``[0, 1]``.
        y_train: ``float32`` one-hot training labels, shape ``(N, num_classes)``.
        x_test: ``float32`` test inputs, same trailing shape as ``x_train``.
        y_test: ``float32`` one-hot test labels.
        num_classes: Number of classes.
        source: Human-readable provenance, including how train and test were split.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(f"{self.name}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
            if y.ndim != 2 or y.shape[1] != self.num_classes:
                raise ValueError(f"{self.name}: y_{split} must have shape (N, {self.num_classes}), got {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: x_train inputs have shape {self.x_train.shape[1:]} but "
                f"x_test inputs have shape {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple:
        """Shape of one input, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    @property
    def max_input_norm(self) -> float:
        """Largest l2 norm an input can have: ``sqrt(prod(input_shape))``.

        Inputs have ``d = prod(input_shape)`` entries in ``[0, 1]``, hence
        ``||x||_2 <= sqrt(d)``. This is the bound the preprocessing guarantees; a DP
        model may clip inputs to a smaller bound of its own.
        """
        return math.sqrt(math.prod(self.input_shape))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


# ---------------------------------------------------------------------------------------
# Shared preprocessing
# ---------------------------------------------------------------------------------------


def check_finite(array, name: str) -> np.ndarray:
    """Raise ``ValueError`` naming ``name`` if ``array`` holds NaN or infinite values.

    Args:
        array: Array-like to check.
        name: Name used in the error message (e.g. ``"x_train"``).

    Returns:
        ``array`` as a NumPy array.

    Raises:
        ValueError: If the array is not numeric or contains NaN / inf.
    """
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            n_bad = int(finite.size - np.count_nonzero(finite))
            raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return a


def images_to_unit_float(x, name: str, max_value: Optional[float] = None) -> np.ndarray:
    """Convert inputs to ``float32`` values in ``[0, 1]``.

    Integer inputs are taken to lie in ``[0, max_value]`` (``255`` by default, i.e.
    ``uint8`` pixels) and divided by ``max_value``. Float inputs are divided by
    ``max_value`` when it is given, otherwise they must already lie in ``[0, 1]``.
    Values outside the expected range raise instead of being clipped silently.

    Input norm bound: every returned input with ``d`` entries has ``||x||_2 <= sqrt(d)``.

    Args:
        x: Input array (any shape, first axis = examples).
        name: Name used in error messages.
        max_value: Value that maps to ``1.0``.

    Returns:
        A contiguous ``float32`` array with values in ``[0, 1]``.

    Raises:
        ValueError: If ``x`` is empty, holds NaN / inf, or values out of range.
    """
    x = check_finite(x, name)
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if x.dtype.kind == "b":
        x = x.astype(np.uint8)
        max_value = 1 if max_value is None else max_value
    if max_value is None and x.dtype.kind in "iu":
        max_value = 255
    lo, hi = x.min(), x.max()
    if max_value is not None:
        if lo < 0 or hi > max_value:
            raise ValueError(f"{name} has values in [{lo}, {hi}], expected values in [0, {max_value}]")
        out = x.astype(np.float32) / np.float32(max_value)
    else:
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} is floating point with values in [{lo}, {hi}]; expected values "
                "in [0, 1] (or uint8 pixels in [0, 255])"
            )
        out = x.astype(np.float32)
    return np.ascontiguousarray(out)


def add_channel_axis(x: np.ndarray, name: str = "x") -> np.ndarray:
    """Give greyscale images ``(N, H, W)`` a trailing channel axis ``(N, H, W, 1)``.

    ``NHWC`` images and ``N x d`` vectors are returned unchanged. Only the shape changes,
    so the input norm bound ``||x||_2 <= sqrt(d)`` is unaffected.

    Args:
        x: Input array.
        name: Name used in error messages.

    Returns:
        The array with 2 (vectors) or 4 (images) dimensions.

    Raises:
        ValueError: For arrays with fewer than 2 or more than 4 dimensions.
    """
    if x.ndim == 3:
        return x[..., np.newaxis]
    if x.ndim in (2, 4):
        return x
    raise ValueError(f"{name} must have shape (N, d), (N, H, W) or (N, H, W, C), got {x.shape}")


def labels_to_one_hot(y, num_classes: int, name: str) -> np.ndarray:
    """Convert integer labels (or validate one-hot labels) to ``float32`` one-hot rows.

    Accepted inputs: integer labels of shape ``(N,)`` or ``(N, 1)`` (floats holding whole
    numbers are accepted too), or one-hot rows of shape ``(N, num_classes)`` with
    exactly one ``1`` per row.

    Args:
        y: Labels.
        num_classes: Number of classes.
        name: Name used in error messages.

    Returns:
        ``float32`` array of shape ``(N, num_classes)``.

    Raises:
        ValueError: For NaN / inf, non-integer labels, labels outside
            ``[0, num_classes)`` or rows that are not one-hot.
    """
    y = check_finite(y, name)
    if y.ndim == 2 and y.shape[1] == 1 and num_classes != 1:
        y = y[:, 0]
    if y.ndim == 1:
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise ValueError(f"{name} holds non-integer labels")
        labels = y.astype(np.int64)
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} label(s) outside [0, {num_classes - 1}], e.g. {y[np.argmax(bad)]}"
            )
        out = np.zeros((len(labels), num_classes), dtype=np.float32)
        out[np.arange(len(labels)), labels] = 1.0
        return out
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(f"{name} has one-hot width {y.shape[1]}, expected {num_classes} classes")
        if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
            raise ValueError(f"{name} is 2-D but its rows are not one-hot")
        return np.ascontiguousarray(y, dtype=np.float32)
    raise ValueError(f"{name} must have shape (N,), (N, 1) or (N, num_classes), got {y.shape}")


def _infer_num_classes(*labels: np.ndarray) -> int:
    """Number of classes implied by integer labels (max + 1) or one-hot width."""
    widths = set()
    for y in labels:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] > 1:
            widths.add(int(y.shape[1]))
        elif y.size:
            widths.add(int(np.nanmax(y)) + 1)
    if not widths:
        raise ValueError("cannot infer the number of classes from empty labels")
    return max(widths)


def _make_dataset(
    name: str,
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes: int,
    source: str,
    max_value: Optional[float] = None,
) -> Dataset:
    """Apply the shared preprocessing to raw arrays and build a :class:`Dataset`."""
    xs, ys = {}, {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = np.asarray(x)
        y = np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"{name}: x_{split} has {len(x)} examples but y_{split} has {len(y)} labels")
        x = images_to_unit_float(x, f"x_{split}", max_value=max_value)
        xs[split] = add_channel_axis(x, f"x_{split}")
        ys[split] = labels_to_one_hot(y, num_classes, f"y_{split}")
    return Dataset(
        name=name,
        x_train=xs["train"],
        y_train=ys["train"],
        x_test=xs["test"],
        y_test=ys["test"],
        num_classes=num_classes,
        source=source,
    )


def _first_last_split(x: np.ndarray, y: np.ndarray, split: Split):
    """Split arrays in order: the first ``n_train`` examples train, the rest test."""
    n = len(x)
    if split is None:
        split = T10K_TRAIN_FRACTION
    if isinstance(split, (bool, np.bool_)):
        raise ValueError(f"split must be an int or a float in (0, 1), got {split!r}")
    if isinstance(split, (float, np.floating)):
        if not 0.0 < split < 1.0:
            raise ValueError(f"a fractional split must lie in (0, 1), got {split}")
        n_train = int(round(split * n))
    else:
        n_train = int(split)
    if not 0 < n_train < n:
        raise ValueError(
            f"split={split!r} leaves {n_train} of {n} examples for training; both train and test must be non-empty"
        )
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), n_train


# ---------------------------------------------------------------------------------------
# File readers
# ---------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.dtype(np.uint8)}


def _read_bytes(path: str) -> bytes:
    """Read a file, transparently decompressing ``.gz``; corrupt gzip -> DataFormatError."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataFormatError(f"{path}: cannot read file ({type(e).__name__}: {e})") from e


def read_idx(path: PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed.

    The header is checked: the magic number must be ``0x0000080N`` (unsigned bytes,
    ``N`` dimensions; ``0x00000803`` for images, ``0x00000801`` for labels) and the data
    must hold exactly ``prod(dims)`` bytes.

    Args:
        path: File path (``.gz`` is decompressed).
        expected_ndim: If given, the number of dimensions the file must declare.

    Returns:
        A ``uint8`` array of the declared shape (values in ``[0, 255]``).

    Raises:
        DataFormatError: Naming the file if it is corrupt, truncated or not IDX.
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    expected_magic = f"0x{0x0800 + expected_ndim:08x}" if expected_ndim is not None else "0x0000080N"
    if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_TYPES or ndim == 0:
        raise DataFormatError(
            f"{path}: not an unsigned-byte IDX file (magic number 0x{magic:08x}, expected {expected_magic})"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataFormatError(
            f"{path}: IDX file has {ndim} dimension(s) (magic number 0x{magic:08x}), "
            f"expected {expected_ndim} (magic number {expected_magic})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise DataFormatError(
            f"{path}: IDX header declares shape {dims} ({expected} bytes of data) but the "
            f"file holds {found} bytes of data ({'truncated' if found < expected else 'trailing bytes'})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and NumPy arrays.

    CIFAR-10 batches are pickles; refusing any other global keeps a tampered file from
    running code when it is loaded.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 "python version" batch into ``(N, 32, 32, 3)`` uint8 + labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFormatError(f"{path}: CIFAR-10 batch lacks 'data'/'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    if labels.shape != (len(data),):
        raise DataFormatError(f"{path}: {len(data)} images but 'labels' has shape {labels.shape}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values): convert to NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _read_npz_arrays(path: str):
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataFormatError(f"{path}: missing array(s) {missing}; expected {list(keys)} (found {f.files})")
            return tuple(f[k] for k in keys)
    except (OSError, ValueError, zlib.error) as e:
        if isinstance(e, (DataFormatError, FileNotFoundError)):
            raise
        raise DataFormatError(f"{path}: cannot read .npz ({e})") from e


def _find(folder: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return p
    return None


def _check_dir(data_dir: PathLike) -> str:
    data_dir = os.fspath(data_dir)
    if not os.path.exists(data_dir):
        raise DataUnavailableError(f"data_dir {data_dir!r} does not exist")
    return data_dir


# ---------------------------------------------------------------------------------------
# Downloads (online users)
# ---------------------------------------------------------------------------------------


def _download(name: str, pretty: str, keras_module: str, expected_files: str):
    """Fetch ``((x_train, y_train), (x_test, y_test)), source`` via tfds or keras."""
    errors = []
    try:
        import tensorflow_datasets as tfds  # optional dependency
    except ImportError:
        tfds = None
    if tfds is not None:
        try:
            train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True))
            return (train, test), f"{pretty} via tensorflow_datasets ({name!r}, official train/test split)"
        except Exception as e:  # noqa: BLE001 - any failure means "try the next source"
            errors.append(f"tensorflow_datasets.load({name!r}): {type(e).__name__}: {e}")
    call = f"keras.datasets.{keras_module}.load_data()"
    try:
        loader = getattr(keras.datasets, keras_module).load_data
        arrays = loader()
        return arrays, f"{pretty} via {call} (official train/test split)"
    except Exception as e:  # noqa: BLE001 - offline machines raise various errors
        errors.append(f"{call}: {type(e).__name__}: {e}")
        raise DataUnavailableError(
            f"Could not download {pretty}: the download failed ("
            + "; ".join(errors)
            + "). This machine may be offline. Pass a local folder instead: "
            f"data_dir=... in Python (load({name!r}, data_dir=DIR)) or --data-dir DIR on "
            f"the command line, where DIR holds {expected_files}."
        ) from e


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled hand-written digits (1,797 8x8 images, 10 classes).

    Ships with scikit-learn, so no network is needed. Pixels (integers in ``[0, 16]``)
    are divided by 16, giving ``8x8x1`` ``float32`` images in ``[0, 1]`` with
    ``||x||_2 <= sqrt(64) = 8``. The split is stratified by class and seeded.

    Args:
        test_fraction: Fraction of the 1,797 images held out for testing.
        seed: Random seed of the stratified split.

    Returns:
        The :class:`Dataset`.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images,
        bunch.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=bunch.target,
    )
    source = (
        f"scikit-learn digits (UCI hand-written digits, {len(bunch.images)} 8x8 images, "
        f"pixels 0-16 scaled to [0, 1]), stratified random split {len(x_train)} train / "
        f"{len(x_test)} test (test_fraction={test_fraction}, seed={seed})"
    )
    return _make_dataset("digits", x_train, y_train, x_test, y_test, 10, source, max_value=16)


def _idx_names(stem: str) -> Tuple[str, ...]:
    # Official names use "-idx3-ubyte"; some mirrors use ".idx3-ubyte".
    kind = stem.rsplit("-", 1)[1]  # "images" or "labels"
    ndim = 3 if kind == "images" else 1
    names = (f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte")
    return tuple(n + ext for n in names for ext in ("", ".gz"))


def _load_idx_family(
    name: str,
    pretty: str,
    keras_module: str,
    npz_names: Sequence[str],
    data_dir: Optional[PathLike],
    split: Split,
) -> Dataset:
    expected_files = (
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (each optionally .gz; the two t10k files alone also "
        "work: the first 8,000 of the 10,000 images train, the last 2,000 test), "
        f"or {npz_names[0]} with arrays x_train, y_train, x_test, y_test"
    )
    if data_dir is None:
        if split is not None:
            warnings.warn(f"split={split!r} is ignored: downloads use the official split")
        ((x_train, y_train), (x_test, y_test)), source = _download(name, pretty, keras_module, expected_files)
        return _make_dataset(name, x_train, y_train, x_test, y_test, 10, source)

    data_dir = _check_dir(data_dir)
    if os.path.isfile(data_dir) and data_dir.endswith(".npz"):
        npz = data_dir
    else:
        npz = _find(data_dir, npz_names)
    files = {
        stem: _find(data_dir, _idx_names(stem)) if os.path.isdir(data_dir) else None
        for stem in ("train-images", "train-labels", "t10k-images", "t10k-labels")
    }

    def read_pair(prefix):
        x = read_idx(files[f"{prefix}-images"], expected_ndim=3)
        y = read_idx(files[f"{prefix}-labels"], expected_ndim=1)
        if len(x) != len(y):
            raise DataFormatError(
                f"{files[prefix + '-images']} holds {len(x)} images but "
                f"{files[prefix + '-labels']} holds {len(y)} labels"
            )
        return x, y

    have = {stem for stem, p in files.items() if p}
    if have == set(files):
        (x_train, y_train), (x_test, y_test) = read_pair("train"), read_pair("t10k")
        if split is not None:
            warnings.warn(f"split={split!r} is ignored: the official training set was found")
        source = (
            f"{pretty} official train/test sets (IDX files) from {data_dir}: {len(x_train)} train / {len(x_test)} test"
        )
    elif npz is not None:
        x_train, y_train, x_test, y_test = _read_npz_arrays(npz)
        if split is not None:
            warnings.warn(f"split={split!r} is ignored: {npz} holds its own train/test split")
        source = f"{pretty} from {npz}: {len(x_train)} train / {len(x_test)} test (as stored)"
    elif have == {"t10k-images", "t10k-labels"}:
        x, y = read_pair("t10k")
        (x_train, y_train), (x_test, y_test), n_train = _first_last_split(x, y, split)
        source = (
            f"{pretty} official test set ({os.path.basename(files['t10k-images'])}, "
            f"{os.path.basename(files['t10k-labels'])}) from {data_dir}, split "
            f"{n_train} train / {len(x) - n_train} test (first {n_train} / last "
            f"{len(x) - n_train}; the official training set was not available)"
        )
    else:
        missing = [stem for stem in files if stem not in have]
        listing = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else [data_dir]
        raise DataUnavailableError(
            f"No usable {pretty} files in {data_dir} (missing: {', '.join(missing)}; "
            f"found: {listing[:20]}). Expected {expected_files}."
        )
    return _make_dataset(name, x_train, y_train, x_test, y_test, 10, source)


def load_mnist(data_dir: Optional[PathLike] = None, split: Split = None) -> Dataset:
    """MNIST hand-written digits: 28x28x1 images in ``[0, 1]``, 10 classes.

    Pixels (uint8 in ``[0, 255]``) are divided by 255, so every input satisfies
    ``||x||_2 <= sqrt(784) = 28``.

    Args:
        data_dir: Folder with local files, tried in this order:
            the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally
            ``.gz``); ``mnist.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``
            (``keras.datasets`` layout; ``data_dir`` may also be the ``.npz`` path
            itself); the two ``t10k`` files alone, split in order (first 8,000 train /
            last 2,000 test by default). ``None`` downloads the data.
        split: Only for the ``t10k``-only layout: the number of leading images used
            for training (int) or that fraction of the images (float in ``(0, 1)``).
            Defaults to :data:`T10K_TRAIN_FRACTION` (8,000 / 2,000 for 10,000 images).
            Ignored, with a warning, when a full train/test split is available.
            Note: in the official MNIST test set the first 5,000 images (from NIST's
            training writers) are cleaner than the last 5,000, so the default last-2,000
            test part is harder than the full test set; report numbers with ``source``.

    Returns:
        The :class:`Dataset`; ``source`` says which files and which split were used.

    Raises:
        DataUnavailableError: If the download fails or ``data_dir`` lacks the files.
        DataFormatError: If a file is corrupt (the message names the file).
    """
    return _load_idx_family("mnist", "MNIST", "mnist", ("mnist.npz",), data_dir, split)


def load_fashion_mnist(data_dir: Optional[PathLike] = None, split: Split = None) -> Dataset:
    """Fashion-MNIST: 28x28x1 images in ``[0, 1]``, 10 classes.

    Pixels (uint8 in ``[0, 255]``) are divided by 255, so every input satisfies
    ``||x||_2 <= sqrt(784) = 28``. Same file layouts and arguments as
    :func:`load_mnist` (IDX files with the same names, or ``fashion_mnist.npz``).

    Args:
        data_dir: Folder with local files (see :func:`load_mnist`); ``None`` downloads.
        split: Train/test cut for the ``t10k``-only layout (see :func:`load_mnist`).

    Returns:
        The :class:`Dataset`.

    Raises:
        DataUnavailableError: If the download fails or ``data_dir`` lacks the files.
        DataFormatError: If a file is corrupt (the message names the file).
    """
    return _load_idx_family(
        "fashion_mnist",
        "Fashion-MNIST",
        "fashion_mnist",
        ("fashion_mnist.npz", "fashion-mnist.npz"),
        data_dir,
        split,
    )


def load_cifar10(data_dir: Optional[PathLike] = None) -> Dataset:
    """CIFAR-10: 32x32x3 colour images in ``[0, 1]``, 10 classes.

    Pixels (uint8 in ``[0, 255]``) are divided by 255, so every input satisfies
    ``||x||_2 <= sqrt(3072) ~= 55.43``.

    Args:
        data_dir: Folder holding the "CIFAR-10 python version" batches
            ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (directly or in a
            ``cifar-10-batches-py`` subfolder, i.e. the extracted
            ``cifar-10-python.tar.gz``), or ``cifar10.npz`` with ``x_train``,
            ``y_train``, ``x_test``, ``y_test`` (``data_dir`` may also be the ``.npz``
            path itself). ``None`` downloads the data.

    Returns:
        The :class:`Dataset`.

    Raises:
        DataUnavailableError: If the download fails or ``data_dir`` lacks the files.
        DataFormatError: If a file is corrupt (the message names the file).
    """
    batch_names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    npz_names = ("cifar10.npz", "cifar-10.npz")
    expected_files = (
        "the CIFAR-10 python batches data_batch_1..data_batch_5 and test_batch "
        "(optionally in a cifar-10-batches-py subfolder; extract cifar-10-python.tar.gz "
        "first), or cifar10.npz with arrays x_train, y_train, x_test, y_test"
    )
    if data_dir is None:
        ((x_train, y_train), (x_test, y_test)), source = _download("cifar10", "CIFAR-10", "cifar10", expected_files)
        return _make_dataset("cifar10", x_train, y_train, x_test, y_test, 10, source)

    data_dir = _check_dir(data_dir)
    if os.path.isfile(data_dir) and data_dir.endswith(".npz"):
        npz = data_dir
    else:
        npz = _find(data_dir, npz_names)
    for folder in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, b)) for b in batch_names):
            batches = [_read_cifar_batch(os.path.join(folder, b)) for b in batch_names]
            x_train = np.concatenate([b[0] for b in batches[:5]])
            y_train = np.concatenate([b[1] for b in batches[:5]])
            x_test, y_test = batches[5]
            source = (
                f"CIFAR-10 official train/test sets (python batches) from {folder}: "
                f"{len(x_train)} train / {len(x_test)} test"
            )
            break
    else:
        if npz is None:
            raise DataUnavailableError(f"No usable CIFAR-10 files in {data_dir}. Expected {expected_files}.")
        x_train, y_train, x_test, y_test = _read_npz_arrays(npz)
        source = f"CIFAR-10 from {npz}: {len(x_train)} train / {len(x_test)} test (as stored)"
    return _make_dataset("cifar10", x_train, y_train, x_test, y_test, 10, source)


def load_npz(path: PathLike, name: Optional[str] = None, num_classes: Optional[int] = None) -> Dataset:
    """Load any data set stored as ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Inputs may be uint8 / integer pixels in ``[0, 255]`` (divided by 255) or floats
    already in ``[0, 1]``; other ranges raise. Greyscale ``(N, H, W)`` images get a
    channel axis; ``(N, d)`` vectors are kept. Either way each input with ``d``
    entries satisfies ``||x||_2 <= sqrt(d)``. Labels may be integers (``(N,)`` or
    ``(N, 1)``) or one-hot rows.

    Args:
        path: Path of the ``.npz`` file.
        name: Data set name; defaults to the file name without extension.
        num_classes: Number of classes; inferred from the labels when ``None``
            (one-hot width, or largest label + 1 over train and test).

    Returns:
        The :class:`Dataset`.

    Raises:
        DataUnavailableError: If the file does not exist.
        DataFormatError: If the file is unreadable or misses arrays.
        ValueError: For NaN / inf, out-of-range inputs or invalid labels.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataUnavailableError(
            f"{path!r} is not a file; load_npz needs the path of a .npz holding x_train, y_train, x_test, y_test"
        )
    x_train, y_train, x_test, y_test = _read_npz_arrays(path)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    check_finite(y_train, "y_train")
    check_finite(y_test, "y_test")
    if num_classes is None:
        num_classes = _infer_num_classes(y_train, y_test)
    source = f"{path}: {len(x_train)} train / {len(x_test)} test (as stored)"
    return _make_dataset(name, x_train, y_train, x_test, y_test, num_classes, source)


def _load_npz_entry(data_dir: Optional[PathLike] = None, **kwargs) -> Dataset:
    if data_dir is None:
        raise ValueError("load('npz', ...) needs data_dir=<path of the .npz file>")
    return load_npz(data_dir, **kwargs)


def _load_digits_entry(data_dir: Optional[PathLike] = None, **kwargs) -> Dataset:
    if data_dir is not None:
        raise ValueError(
            f"the digits data set ships with scikit-learn and takes no data_dir (got data_dir={os.fspath(data_dir)!r})"
        )
    return load_digits(**kwargs)


#: Registry used by :func:`load`: name -> loader taking ``data_dir=`` and keywords.
DATASETS: Dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits_entry,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "npz": _load_npz_entry,
}

_ALIASES = {"fashion-mnist": "fashion_mnist", "cifar-10": "cifar10", "cifar_10": "cifar10"}


def load(name: str, data_dir: Optional[PathLike] = None, **kwargs) -> Dataset:
    """Load a data set by name.

    Args:
        name: One of ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``,
            ``"npz"`` (case-insensitive; ``"fashion-mnist"`` / ``"cifar-10"`` accepted).
        data_dir: Local folder (or, for ``"npz"``, the ``.npz`` path). Must be ``None``
            for ``"digits"``.
        **kwargs: Passed to the loader (e.g. ``split=`` for MNIST, ``seed=`` for digits).

    Returns:
        The :class:`Dataset`, inputs in ``[0, 1]`` (so ``||x||_2 <= max_input_norm``).

    Raises:
        ValueError: For an unknown name (the message lists the choices).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[key](data_dir=data_dir, **kwargs)


def validation_split(dataset: Dataset, fraction: float) -> Dataset:
    """The data set for hyper-parameter search: the last ``fraction`` of its *training* examples become the test set.

    The real test split is dropped, so choices made on this data set never
    see it. The order of the training examples is kept (no shuffle): the
    carve is reproducible and stated in ``source``.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"a validation fraction must lie in (0, 1), got {fraction!r}")
    n = len(dataset.x_train)
    n_fit = n - int(round(float(fraction) * n))
    if not 0 < n_fit < n:
        raise ValueError(f"validation fraction {fraction} of {n} training examples leaves an empty split")
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[:n_fit],
        y_train=dataset.y_train[:n_fit],
        x_test=dataset.x_train[n_fit:],
        y_test=dataset.y_train[n_fit:],
        source=f"{dataset.source}; VALIDATION: its training examples split {n_fit} fit / {n - n_fit} validation "
        "(last), the test split unused",
    )


def load_configured(dataset_config, data_dir=None) -> Dataset:
    """The data set a config's ``dataset`` section describes (``data_dir`` overrides its folder)."""
    return configured_split(load(dataset_config.name, data_dir=data_dir or dataset_config.data_dir), dataset_config)


def configured_split(dataset: Dataset, dataset_config) -> Dataset:
    """``dataset`` with the config's ``validation_fraction`` carve applied, if any."""
    if dataset_config.validation_fraction is None:
        return dataset
    return validation_split(dataset, dataset_config.validation_fraction)
