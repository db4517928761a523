"""The data sets lipdp knows by name, their loaders, and the validation carve of a config."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from lipdp.data.dataset import (
    Dataset,
    PathLike,
    Split,
    _first_last_split,
    _infer_num_classes,
    _make_dataset,
    check_finite,
)
from lipdp.data.formats import _check_dir, _download, _find, _read_cifar_batch, _read_npz_arrays, read_idx
from lipdp.errors import DataFormatError, DataUnavailableError


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
