"""Keras callbacks for private training.

* :class:`PrivacyLedger` writes ``epsilon`` and ``delta`` into the epoch logs
  (progress bar, ``History``, ``CSVLogger``, TensorBoard). ``DPModel.fit``
  adds one when none is given.
* :class:`BudgetStop` stops training *before* the step that would take
  epsilon past a budget.
* :class:`GradientNoiseMonitor` logs the gradient-to-noise ratio measured on
  held-out (not private) data.

Checkpoint and resume: the number of noisy steps already taken is the
model variable ``privacy_steps``, saved with the weights by
``keras.callbacks.BackupAndRestore`` and ``model.save``; a resumed run
counts the steps it restored once and reports the same epsilon as an
uninterrupted run. Steps taken after the last backup of an interrupted run
are discarded together with the weights they produced.
"""

import numpy as np
import tensorflow as tf

from lipdp import distribute, streaming
from lipdp.backend import keras
from lipdp.errors import PrivacyBudgetExhausted


class PrivacyLedger(keras.callbacks.Callback):
    """Adds ``epsilon`` and ``delta`` (spent so far) to every epoch's logs.

    It also keeps a calibrated plan: when the noise was calibrated to a
    ``target_epsilon`` for ``planned_steps``, training stops after that many
    steps, and a ``fit`` with no step left raises
    :class:`PrivacyBudgetExhausted`. Before the first step of each ``fit``
    (after any ``BackupAndRestore`` restore) it checks that shuffled sampling
    starts at an epoch boundary (``DPModelMixin.check_sampling_alignment``).
    """

    def on_train_begin(self, logs=None):
        self._checked = False

    def on_train_batch_begin(self, batch, logs=None):
        if self._checked:
            return
        self.model.check_sampling_alignment()
        if self.model.steps_left() == 0:
            raise PrivacyBudgetExhausted(
                f"the noise was calibrated for {self.model.privacy.planned_steps} steps to reach "
                f"epsilon={self.model.privacy.target_epsilon}, and they were all taken; "
                "to train longer, start from fresh weights with a plan of more epochs"
            )
        self._checked = True

    def on_train_batch_end(self, batch, logs=None):
        if self.model.steps_left() == 0:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.accountable:  # an unaccountable model has no epsilon to log
            logs["epsilon"] = self.model.epsilon()
            logs["delta"] = self.model.privacy.delta


class BudgetStop(keras.callbacks.Callback):
    """Stops training before the step that would make epsilon exceed ``epsilon_budget``.

    The largest affordable number of steps is computed once from the
    accountant; training stops as soon as the model's ``privacy_steps``
    reaches it, mid-epoch if needed. Raises :class:`PrivacyBudgetExhausted` at
    the start of ``fit`` when not even one more step fits.
    """

    def __init__(self, epsilon_budget, verbose=1):
        super().__init__()
        self.epsilon_budget = float(epsilon_budget)
        self.verbose = verbose
        self.max_steps = None

    def on_train_begin(self, logs=None):
        self.max_steps = self.model.privacy.max_steps(self.epsilon_budget)
        if self.model.steps_taken >= self.max_steps:
            raise PrivacyBudgetExhausted(
                f"the budget epsilon={self.epsilon_budget} allows {self.max_steps} steps and "
                f"{self.model.steps_taken} were already taken (epsilon={self.model.epsilon():.4g})"
            )

    def on_train_batch_end(self, batch, logs=None):
        if self.model.steps_taken >= self.max_steps:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.verbose and self.model.steps_taken >= self.max_steps:
            print(
                f"BudgetStop: stopped after {self.model.steps_taken} steps, "
                f"epsilon={self.model.epsilon():.4g} <= budget {self.epsilon_budget}"
            )


class GradientNoiseMonitor(keras.callbacks.Callback):
    """Logs ``heldout_grad_to_noise``: batch-gradient norm over added-noise norm, on held-out data.

    At each epoch end, with the current (already private) weights, computes
    the gradient sum that a step would noise (clipless: the plain gradient of
    the summed losses; clipping runs: the clipped sum) on a fixed batch of
    ``min(qN, len(x_heldout))`` **held-out** examples, rescaled to a batch of
    the expected size ``qN``, and the expected norm of the noise a step adds,
    ``sqrt(sum_i std_i^2 n_i)`` over variables with ``n_i`` coordinates and
    std ``std_i`` (both on the gradient-sum scale; the division by ``qN``
    cancels). Private training data is never read: the ratio is a
    diagnostic that costs no privacy, unlike the same ratio on training
    batches. Place it before ``CSVLogger`` so the value reaches the CSV.
    """

    def __init__(self, x_heldout, y_heldout, seed=0):
        super().__init__()
        self.x_heldout, self.y_heldout = x_heldout, y_heldout
        self.seed = seed
        self._index = None

    def _heldout_batch(self):
        """The fixed batch, gathered anew at each call (a memory-mapped ``x_heldout`` is not held in memory)."""
        if self._index is None:
            size = max(1, min(len(self.x_heldout), int(round(self.model.privacy.expected_batch_size))))
            self._index = np.random.default_rng(self.seed).permutation(len(self.x_heldout))[:size]
        return (
            tf.constant(streaming.take_rows(self.x_heldout, self._index), tf.float32),
            tf.constant(self.y_heldout[self._index], tf.float32),
        )

    def ratio(self):
        """The current gradient-to-noise ratio (float)."""
        x, y = self._heldout_batch()
        grad_norm, noise_sq = distribute.on_one_replica(self.model, self._norms, x, y)
        scale = self.model.privacy.expected_batch_size / int(x.shape[0])
        return scale * float(grad_norm) / max(float(noise_sq) ** 0.5, 1e-300)

    def _norms(self, x, y):
        """The gradient sum's norm and the expected squared norm of the noise (float64 tensors)."""
        _, _, sums, bounds = self.model.private_gradient_sums(x, y)
        grad_norm = tf.norm(tf.stack([tf.norm(tf.cast(g, tf.float64)) for g in sums]))
        stds = self.model.noise_stddevs(bounds)
        noise_sq = tf.add_n(
            [tf.cast(std, tf.float64) ** 2 * tf.cast(tf.size(g), tf.float64) for std, g in zip(stds, sums)]
        )
        return grad_norm, noise_sq

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and getattr(self.model, "privacy", None) is not None:
            logs["heldout_grad_to_noise"] = self.ratio()
