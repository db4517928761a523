"""Keras callbacks for private training.

* :class:`PrivacyLedger` writes ``epsilon`` and ``delta`` into the epoch logs
  (progress bar, ``History``, ``CSVLogger``, TensorBoard). ``DPModel.fit``
  adds one when none is given.
* :class:`BudgetStop` stops training *before* the step that would take
  epsilon past a budget.

Checkpoint and resume: the number of noisy steps already taken is the
model variable ``privacy_steps``, saved with the weights by
``tf.keras.callbacks.BackupAndRestore`` and ``model.save``; a resumed run
counts the steps it restored once and reports the same epsilon as an
uninterrupted run. Steps taken after the last backup of an interrupted run
are discarded together with the weights they produced.
"""

import tensorflow as tf


class PrivacyBudgetExhausted(RuntimeError):
    """No noisy step fits in what is left of the budget."""


class PrivacyLedger(tf.keras.callbacks.Callback):
    """Adds ``epsilon`` and ``delta`` (spent so far) to every epoch's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.model.epsilon()
            logs["delta"] = self.model.privacy.delta


class BudgetStop(tf.keras.callbacks.Callback):
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
        if int(self.model.privacy_steps) >= self.max_steps:
            raise PrivacyBudgetExhausted(
                f"the budget epsilon={self.epsilon_budget} allows {self.max_steps} steps and "
                f"{int(self.model.privacy_steps)} were already taken (epsilon={self.model.epsilon():.4g})")

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.privacy_steps) >= self.max_steps:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.verbose and int(self.model.privacy_steps) >= self.max_steps:
            print(f"BudgetStop: stopped after {int(self.model.privacy_steps)} steps, "
                  f"epsilon={self.model.epsilon():.4g} <= budget {self.epsilon_budget}")
