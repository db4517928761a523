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

from lipdp.data.dataset import (
    T10K_TRAIN_FRACTION,
    Dataset,
    add_channel_axis,
    check_finite,
    images_to_unit_float,
    labels_to_one_hot,
)
from lipdp.data.formats import read_idx
from lipdp.data.registry import (
    DATASETS,
    configured_split,
    load,
    load_cifar10,
    load_configured,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_npz,
    validation_split,
)
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
    "validation_split",
    "load_configured",
    "configured_split",
]
