"""The run folder: the one owner of what ``lipdp train`` writes and how it is read back.

A completed run folder holds (names below, never spelled elsewhere):

* ``config.yaml`` (:data:`CONFIG`): the resolved config (written before the
  first step; a resume may change only what ``training.RESUMABLE_CHANGES``
  names, and rewrites it);
* ``history.csv`` (:data:`HISTORY`): per-epoch logs (training metrics are on
  private batches and not covered), validation metrics, ``epsilon``,
  ``heldout_grad_to_noise``;
* ``model.keras`` (:data:`MODEL`): the trained model;
* ``sensitivity.txt`` (:data:`SENSITIVITY`): the per-layer bound report;
* ``privacy.json`` (:data:`PRIVACY`): the privacy state and dp-accounting
  ledger -- written last, so its presence marks a completed run;
* ``metrics.json`` (:data:`METRICS`): final test loss and accuracy, and the certified
  accuracy at ``evaluation.certified_radii`` (``certified``, :mod:`lipdp.robustness`);
* ``policy.json`` (:data:`POLICY`): the privacy policy, mechanism and
  training-data fingerprint the steps were taken under (written before the
  first step; a resumed run must match it);
* ``audit.json`` (:data:`AUDIT`): the membership-inference audit, if run;
* ``canary_audit.json`` (:data:`CANARY_AUDIT`): the one-run canary audit of
  the run's config (:mod:`lipdp.canaries`), if run.

While training: ``backup/`` (:data:`BACKUP`, Keras' BackupAndRestore, removed
once the artefacts are written: a run that crashes after its last epoch resumes
with no epoch left and writes them) and ``attempts`` (:data:`ATTEMPTS`, the
number of starts, so a resumed run never replays a sampling seed). With
``model.feature_statistics``, ``feature_statistics.json`` (:data:`STATISTICS`) holds the released
statistics from before the first step on: a resumed run reuses them (the
accountant counts one release). Reports (``report*.html``,
``report*.md``, PNGs) are written by :mod:`lipdp.reports`.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil

import numpy as np

from lipdp.backend import keras
from lipdp.errors import IncompleteRunError, RunExistsError

CONFIG, HISTORY, MODEL, SENSITIVITY = "config.yaml", "history.csv", "model.keras", "sensitivity.txt"
PRIVACY, METRICS, AUDIT, CANARY_AUDIT = "privacy.json", "metrics.json", "audit.json", "canary_audit.json"
BACKUP, ATTEMPTS, STATISTICS, POLICY = "backup", "attempts", "feature_statistics.json", "policy.json"


def path(run_dir, name):
    """The path of file ``name`` (one of this module's constants) in ``run_dir``."""
    return os.path.join(run_dir, name)


def is_complete(run_dir):
    return os.path.isfile(path(run_dir, PRIVACY))


def require_complete(run_dir):
    """Returns ``run_dir`` if it holds a completed run, else raises :class:`IncompleteRunError`."""
    if not is_complete(run_dir):
        raise IncompleteRunError(f"{run_dir} is not a completed run folder (no {PRIVACY})")
    return run_dir


def start(run_dir):
    """Creates ``run_dir`` for a new or resumed run; refuses a completed one (never overwritten)."""
    if is_complete(run_dir):
        raise RunExistsError(f"{run_dir} already holds a completed run; choose another --out")
    os.makedirs(run_dir, exist_ok=True)


def next_attempt(run_dir):
    """Counts starts of this run (0 for the first), so a resumed run never replays a sampling seed."""
    attempts = path(run_dir, ATTEMPTS)
    attempt = int(open(attempts).read()) + 1 if os.path.exists(attempts) else 0
    write_text(run_dir, ATTEMPTS, str(attempt))
    return attempt


def check_resumable(run_dir, seeded):
    """Refuses an interrupted run folder that lost what its resume needs: the backup of the epochs
    ``history.csv`` logged (a resume would train afresh beside outputs of steps no longer accounted), or, for a
    ``seeded`` sampler, the start count (a resume would replay the first start's batches)."""
    logged = os.path.exists(path(run_dir, HISTORY)) and len(read_history(path(run_dir, HISTORY))) > 0
    backed_up = os.path.exists(path(run_dir, BACKUP))
    lost = [BACKUP] if logged and not backed_up else []
    lost += [ATTEMPTS] if seeded and (logged or backed_up) and not os.path.exists(path(run_dir, ATTEMPTS)) else []
    if lost:
        raise IncompleteRunError(
            f"{run_dir} holds an interrupted run that lost {' and '.join(lost)}: resuming would not account, or "
            "would replay, the steps it took; start afresh in a new run folder (--out)"
        )


def remove_backup(run_dir):
    """Removes the backup folder once the run's artefacts are written (kept until then, to resume from)."""
    shutil.rmtree(path(run_dir, BACKUP), ignore_errors=True)


def write_json(run_dir, name, content):
    """Writes atomically: a killed run never leaves a truncated file (a resume reads it back)."""
    _write_atomically(run_dir, name, lambda handle: json.dump(content, handle, indent=2))


def read_json(run_dir, name):
    with open(path(run_dir, name)) as handle:
        return json.load(handle)


def write_text(run_dir, name, text):
    """Writes atomically, as :func:`write_json` (``config.yaml`` is rewritten at each resume)."""
    _write_atomically(run_dir, name, lambda handle: handle.write(text))


def _write_atomically(run_dir, name, write):
    """``write(handle)`` into a temporary file that then replaces ``name``: readers see the old file or the new."""
    temporary = f"{path(run_dir, name)}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as handle:
            write(handle)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # open() itself failed: its error is the one to see
            os.remove(temporary)
        raise
    os.replace(temporary, path(run_dir, name))


@dataclasses.dataclass
class Run:
    """What ``lipdp train`` left in ``path``; the model and data load on first use."""

    path: str
    config: object
    history: dict
    privacy: dict
    metrics: dict
    data_dir: str = None
    _model: object = None
    _dataset: object = None

    @property
    def model(self):
        if self._model is None:
            import lipdp  # noqa: F401  (registers the layers, losses and models)

            self._model = keras.models.load_model(path(self.path, MODEL))
        return self._model

    def dataset(self):
        """The run's data set (``data_dir`` overrides the config's)."""
        if self._dataset is None:
            from lipdp import data

            self._dataset = data.load_configured(self.config.dataset, data_dir=self.data_dir)
        return self._dataset

    @property
    def certified(self):
        """Whether the run's gradient mechanism certifies per-layer bounds (clipless training)."""
        return self.model.mechanism.certifies_layer_bounds


def read_history(path):
    """``history.csv`` as ``{column: float array}`` (empty cells are NaN)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = rows[0].keys() if rows else []
    return {c: np.array([float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows]) for c in columns}


def load_run(run_dir, data_dir=None):
    """Reads a completed run folder written by :func:`lipdp.training.run`."""
    from lipdp import config

    require_complete(run_dir)
    return Run(
        path=run_dir,
        config=config.load(path(run_dir, CONFIG)),
        history=read_history(path(run_dir, HISTORY)),
        privacy=read_json(run_dir, PRIVACY),
        metrics=read_json(run_dir, METRICS),
        data_dir=data_dir,
    )
