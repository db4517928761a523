"""Fault tolerance: ``lipdp train`` killed with SIGKILL in the middle of an epoch, then started again.

The resumed run must complete from the last backup (``out/backup``, written by
``tf.keras.callbacks.BackupAndRestore`` at each epoch end), and ``privacy.json``
must count exactly the noisy steps applied to the saved weights: the steps of
the killed epoch that were never backed up are lost with the weights they
produced, and are neither counted twice nor forgotten.

No sleep assumes a speed. The first run prints its progress bar (``--verbose
1``) into a file; the test polls it until the run is past its first backup and
has taken a step of a later epoch, freezes the process (SIGSTOP), and checks,
while nothing can move, that the backup on disk holds fewer steps than the log
shows were applied (steps are printed only after they ran). Only then does it
send SIGKILL; otherwise it lets the process go on (SIGCONT) and waits for the
next chance. Every wait has a generous deadline.
"""

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from lipdp import sampling
from lipdp.ledger import ledger_to_json
from lipdp.policy import PrivacyPolicy

pytestmark = pytest.mark.skipif(
    not all(hasattr(signal, s) for s in ("SIGKILL", "SIGSTOP", "SIGCONT")), reason="needs POSIX signals"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
N_TRAIN = 1437  # the embedded digits split: 1437 train / 360 test
BATCH, EPOCHS, TARGET, SEED = 16, 3, 4.0, 7
STEPS_PER_EPOCH = sampling.steps_per_epoch("poisson", N_TRAIN, BATCH)  # ceil(1437 / 16) = 90
PLANNED_STEPS = EPOCHS * STEPS_PER_EPOCH
OVERRIDES = [
    "model.layers=[{type: Flatten}, {type: LipschitzDense, units: 16}, {type: GroupSort},"
    " {type: LipschitzDense, units: 10}]",
    f"training.epochs={EPOCHS}",
    "sampling.kind=poisson",
    f"sampling.batch_size={BATCH}",
    f"sampling.seed={SEED}",  # exercises the attempts file: a resumed run must not replay the seed
    f"privacy.target_epsilon={TARGET}",
]
DEADLINE_S = 300  # per process; a run takes ~15 s on an idle 2-core machine
POLL_S = 0.05

EPOCH_HEADER = re.compile(rf"Epoch (\d+)/{EPOCHS}\b")
PROGRESS = re.compile(rf"(\d+)/{STEPS_PER_EPOCH} \[")  # Keras' progress bar, printed after a step has run


def _command(out):
    args = [sys.executable, "-m", "lipdp.cli", "train", DIGITS, "--out", out, "--verbose", "1"]
    return args + [a for s in OVERRIDES for a in ("--set", s)]


def _env():
    # CPU only, as in CI; unbuffered, although Keras flushes every progress update anyway.
    return dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")


def _read(path):
    with open(path, errors="replace") as handle:
        return handle.read()


def _steps_seen(log_text):
    """Noisy steps the log proves were applied: ``(epoch, steps)`` of the last epoch that printed a step, or None."""
    headers = list(EPOCH_HEADER.finditer(log_text))
    if not headers:
        return None
    epoch = int(headers[-1].group(1))
    done = [int(k) for k in PROGRESS.findall(log_text[headers[-1].end() :])]
    if not done or max(done) == 0:
        return None
    return epoch, (epoch - 1) * STEPS_PER_EPOCH + max(done)


def _backup(out):
    """``(variables, path)`` of the newest complete checkpoint in ``out/backup`` (None if there is none)."""
    path = tf.train.latest_checkpoint(os.path.join(out, "backup", "chief"))
    if path is None:
        return None, None
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, shape in tf.train.list_variables(path) if shape == []}, path


def _optimizer_iterations(variables):
    keys = [k for k in variables if re.fullmatch(r"model/optimizer/_?iter\w*/\.ATTRIBUTES/VARIABLE_VALUE", k)]
    assert len(keys) == 1, sorted(variables)
    return int(variables[keys[0]])


def _kill_mid_epoch(proc, out, log_path, err_path):
    """Freezes ``proc`` once it is certified mid-epoch past a backup, then SIGKILLs it.

    Returns ``(epoch, steps_seen, backup_variables)``.
    """
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (rc={proc.returncode}) before it could be killed mid-epoch; "
                f"stderr:\n{_read(err_path)[-3000:]}"
            )
        seen = _steps_seen(_read(log_path))
        if seen is not None and seen[0] >= 2:  # epoch 1 has ended, so a backup exists
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                if not _wait_stopped(proc):  # frozen: neither the log nor the backup can change from here on
                    continue  # it ended just before the signal: reported at the top of the loop
                seen = _steps_seen(_read(log_path))  # may have moved on before the freeze
                variables, _ = _backup(out)
                assert variables is not None, f"no backup checkpoint in {out}/backup; log: {_read(log_path)!r}"
                if seen is not None and int(variables["model/privacy_steps/.ATTRIBUTES/VARIABLE_VALUE"]) < seen[1]:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                    return seen[0], seen[1], variables
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            # The epoch's backup was written before the freeze: try again in the next epoch.
        time.sleep(POLL_S)
    pytest.fail(f"no mid-epoch point seen within {DEADLINE_S} s; log tail:\n{_read(log_path)[-2000:]!r}")


def _wait_stopped(proc):
    """Waits until every thread of ``proc`` is stopped (state T) and returns True; False if it ended instead."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        states = set()
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{task}/stat") as handle:
                    states.add(handle.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just exited
                pass
        if states and states <= {"T", "t"}:
            return True
        time.sleep(0.01)
    pytest.fail(f"process {proc.pid} did not stop within 60 s of SIGSTOP")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process state from /proc")
def test_sigkill_mid_epoch_then_resume_counts_exactly_the_applied_steps(tmp_path):
    out = str(tmp_path / "run")
    log1, err1 = str(tmp_path / "first.log"), str(tmp_path / "first.err")
    with open(log1, "w") as stdout, open(err1, "w") as stderr:
        proc = subprocess.Popen(
            _command(out), cwd=ROOT, env=_env(), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
        )
    try:
        epoch, steps_seen, backup = _kill_mid_epoch(proc, out, log1, err1)
    finally:
        if proc.poll() is None:  # a failed assertion above: never leave the child behind
            proc.kill()
            proc.wait(timeout=60)

    # The first run was killed mid-epoch, before it completed anything.
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "privacy.json"))
    assert not os.path.exists(os.path.join(out, "model.keras"))
    backed_up = int(backup["model/privacy_steps/.ATTRIBUTES/VARIABLE_VALUE"])
    saved_epoch = int(backup["ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"])  # 0-based
    assert saved_epoch == epoch - 2  # the backup is from the end of the epoch before the killed one
    # The backup holds whole epochs, and as many optimizer updates (and Keras train steps) as noisy steps.
    assert backed_up == (saved_epoch + 1) * STEPS_PER_EPOCH == _optimizer_iterations(backup)
    assert int(backup["train_counter/.ATTRIBUTES/VARIABLE_VALUE"]) == backed_up
    assert backed_up < steps_seen <= backed_up + STEPS_PER_EPOCH  # applied in memory, lost with the process
    assert open(os.path.join(out, "attempts")).read() == "0"
    print(f"killed in epoch {epoch} after >= {steps_seen} noisy steps; the backup held {backed_up}")

    # Started again with the same command: resumes from the backup and completes.
    log2 = str(tmp_path / "second.log")
    with open(log2, "w") as stdout:
        second = subprocess.run(
            _command(out),
            cwd=ROOT,
            env=_env(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=DEADLINE_S,
        )
    assert second.returncode == 0, second.stderr[-3000:]
    first_epoch = int(EPOCH_HEADER.search(_read(log2)).group(1))
    assert first_epoch == epoch  # restarts the killed epoch from the backup, not the run from scratch
    assert not os.path.exists(os.path.join(out, "backup"))  # removed once the run is complete
    assert open(os.path.join(out, "attempts")).read() == "1"  # a second sampler seed, not a replay

    # privacy.json counts exactly the steps in the saved weights: the plan, once.
    privacy = json.load(open(os.path.join(out, "privacy.json")))
    assert privacy["steps"] == PLANNED_STEPS == privacy["planned_steps"]
    model = tf.keras.models.load_model(os.path.join(out, "model.keras"))
    assert int(model.privacy_steps) == PLANNED_STEPS
    # One optimizer update per noisy step: the counted steps are the ones applied to these weights.
    assert not isinstance(model.optimizer, tf.keras.optimizers.legacy.Optimizer)  # its state would not be saved
    assert int(model.optimizer.iterations) == PLANNED_STEPS
    assert json.loads(json.dumps(model.privacy_state())) == privacy

    # Epsilon: recomputed from the recorded policy for those steps, and never above the target.
    policy = PrivacyPolicy(**{f.name: privacy[f.name] for f in dataclasses.fields(PrivacyPolicy)})
    assert policy.target_epsilon == TARGET and policy.steps_per_epoch == STEPS_PER_EPOCH
    assert policy.epsilon(PLANNED_STEPS) == privacy["epsilon"] <= TARGET
    assert json.loads(json.dumps(ledger_to_json(policy.ledger(PLANNED_STEPS)))) == privacy["ledger"]
    with open(os.path.join(out, "history.csv")) as handle:
        rows = list(csv.DictReader(handle))  # the first run's rows, then the resumed run's
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for row in rows:
        epsilon = float(row["epsilon"])
        assert epsilon <= TARGET
        assert epsilon == pytest.approx(policy.epsilon((int(row["epoch"]) + 1) * STEPS_PER_EPOCH), rel=1e-9)
    assert float(rows[-1]["epsilon"]) == pytest.approx(privacy["epsilon"], rel=1e-12)
