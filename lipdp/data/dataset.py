"""The :class:`Dataset` type and the preprocessing every loader shares (the only place inputs are bounded)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Union

import numpy as np

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
