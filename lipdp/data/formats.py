"""Local file formats (IDX, CIFAR python batches, ``.npz``) and the online fallback (``keras.datasets``)."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from lipdp.backend import keras
from lipdp.data.dataset import PathLike
from lipdp.errors import DataFormatError, DataUnavailableError

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
