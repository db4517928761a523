"""Augmentation multiplicity: K augmented views of each example, their losses averaged per example.

De et al. (2022) train DP models on ``K`` randomly augmented copies of each
sampled example and average the ``K`` losses of an example into its loss.
For clipless training (:class:`lipdp.sensitivity.CertifiedBounds`) the bound
needs one observation: the example's gradient is the sum of its ``K`` views'
gradients, and each view's loss is ``1/K`` of an ``L``-Lipschitz loss. The
bound propagation therefore starts from the cotangent bound ``L / K`` at the
logits, goes through the layers as usual (a :class:`~lipdp.layers.ClipGradient`
caps each *view*'s cotangent), and multiplies the resulting per-view bounds
by ``K`` (:func:`lipdp.sensitivity.gradient_bound_tensors` with ``views=K``).
Without gradient clipping this gives the single-view bound; with a
``ClipGradient(c)`` it is the bound of a clip at ``min(K c, L)``: each of the
``K`` views may reach ``c``, so their sum may reach ``K c``.

The augmentations are random maps of the example alone, drawn independently
of the data, and act before the model's input clip, so any augmentation keeps
the guarantee; they run in the train step only (``model(x)`` and evaluation
see the raw input). Keras' random image layers (``RandomFlip``,
``RandomTranslation``, ``RandomRotation``, ``RandomZoom``, ``RandomContrast``,
``RandomBrightness``) are accepted from configs.
"""

import tensorflow as tf

from lipdp.backend import keras
from lipdp.errors import ConfigError

#: Keras layers a config may list under ``model.mechanism.augmentation.layers``.
CONFIG_LAYERS = (
    "RandomFlip",
    "RandomTranslation",
    "RandomRotation",
    "RandomZoom",
    "RandomContrast",
    "RandomBrightness",
)


class AugmentationMultiplicity:
    """``multiplicity`` views of each example through ``layers`` (applied in training mode), losses averaged.

    Args:
        multiplicity: the number ``K >= 1`` of views per example.
        layers: Keras layers that map a batch to a batch of the same shape
            (random augmentations); none gives ``K`` identical views.
    """

    def __init__(self, multiplicity, layers=()):
        if isinstance(multiplicity, bool) or not isinstance(multiplicity, int) or multiplicity < 1:
            raise ValueError(f"multiplicity must be a positive integer, got {multiplicity!r}")
        self.multiplicity = multiplicity
        self.layers = list(layers)

    def forward(self, model, x, y):
        """``(y_pred, per_sample_loss)`` of the batch: each example's predictions and losses averaged over its views."""
        views = tf.repeat(x, self.multiplicity, axis=0)  # x0, x0, ..., x1, x1, ...
        for layer in self.layers:
            views = layer(views, training=True)
        y_pred = model(views, training=True)
        per_view_loss = model.loss.call(tf.repeat(y, self.multiplicity, axis=0), y_pred)
        return self._per_example_mean(y_pred), self._per_example_mean(per_view_loss)

    def _per_example_mean(self, values):
        shape = tf.concat([[-1, self.multiplicity], tf.shape(values)[1:]], 0)
        return tf.reduce_mean(tf.reshape(values, shape), axis=1)

    def get_config(self):
        """The settings only: a layer's ``build_config`` (present once it ran) would change the privacy record."""
        layers = [keras.layers.serialize(layer) for layer in self.layers]
        return {
            "multiplicity": self.multiplicity,
            "layers": [{k: v for k, v in layer.items() if k != "build_config"} for layer in layers],
        }

    @classmethod
    def from_config(cls, config):
        return cls(config["multiplicity"], [keras.layers.deserialize(layer) for layer in config.get("layers", [])])

    def __repr__(self):
        names = ", ".join(type(layer).__name__ for layer in self.layers) or "no augmentation"
        return f"AugmentationMultiplicity({self.multiplicity}, [{names}])"


def plain_forward(model, x, y):
    """``(y_pred, per_sample_loss)`` without augmentation."""
    y_pred = model(x, training=True)
    return y_pred, model.loss.call(y, y_pred)


def from_spec(spec):
    """The :class:`AugmentationMultiplicity` of ``model.mechanism.augmentation`` (``None`` stays ``None``)."""
    if spec is None:
        return None
    spec = dict(spec)
    unknown = set(spec) - {"multiplicity", "layers"}
    if unknown:
        raise ConfigError(
            f"model.mechanism.augmentation: unknown key(s) {sorted(unknown)}; known keys: multiplicity, layers"
        )
    layers = []
    for layer_spec in spec.get("layers") or []:
        arguments = dict(layer_spec)
        name = arguments.pop("type", None)
        if name not in CONFIG_LAYERS:
            raise ConfigError(f"model.mechanism.augmentation.layers: {name!r} is not one of {', '.join(CONFIG_LAYERS)}")
        try:
            layers.append(getattr(keras.layers, name)(**arguments))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.mechanism.augmentation.layers: {name}: {error}") from error
    try:
        return AugmentationMultiplicity(spec.get("multiplicity", 1), layers)
    except ValueError as error:
        raise ConfigError(f"model.mechanism.augmentation.multiplicity: {error}") from error
