"""The run folder (lipdp/runs.py): completeness, never overwriting a run, resumable starts, atomic records."""

import json
import os

import numpy as np
import pytest

from lipdp import runs
from lipdp.errors import IncompleteRunError, RunExistsError


def test_a_run_is_complete_once_its_privacy_record_is_written(tmp_path):
    run = str(tmp_path / "run")
    runs.start(run)
    assert not runs.is_complete(run)
    with pytest.raises(IncompleteRunError, match="no privacy.json"):
        runs.require_complete(run)
    runs.write_json(run, runs.PRIVACY, {"epsilon": 1.0})
    assert runs.require_complete(run) == run
    with pytest.raises(RunExistsError, match="already holds a completed run"):
        runs.start(run)  # a completed run is never overwritten


def test_each_start_of_a_run_is_counted(tmp_path):
    """A resumed run must never replay the sampling seed of an earlier start."""
    run = str(tmp_path)
    assert [runs.next_attempt(run) for _ in range(3)] == [0, 1, 2]


def test_json_records_are_replaced_whole(tmp_path):
    run = str(tmp_path)
    runs.write_json(run, runs.POLICY, {"a": 1})
    runs.write_json(run, runs.POLICY, {"b": [1, 2]})
    assert runs.read_json(run, runs.POLICY) == {"b": [1, 2]}
    assert os.listdir(run) == [runs.POLICY]  # no temporary file left behind
    assert json.load(open(runs.path(run, runs.POLICY))) == {"b": [1, 2]}


def test_a_failed_rewrite_of_the_config_leaves_the_previous_one(tmp_path):
    """config.yaml is rewritten at every resume, and a non-chief worker reads the chief's while it may be
    rewritten: a write killed half-way must never leave a truncated config (the next resume would be refused)."""
    run = str(tmp_path)
    runs.write_text(run, runs.CONFIG, "training: {epochs: 3}\n")
    with pytest.raises(UnicodeEncodeError):
        runs.write_text(run, runs.CONFIG, "training: {epochs: 4}  # \ud800\n")  # fails while writing
    assert open(runs.path(run, runs.CONFIG)).read() == "training: {epochs: 3}\n"
    assert os.listdir(run) == [runs.CONFIG]  # no temporary file left behind


def test_history_reads_empty_cells_as_nan(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_accuracy\n0,1.5,\n1,1.25,0.5\n")
    columns = runs.read_history(str(history))
    np.testing.assert_array_equal(columns["loss"], [1.5, 1.25])
    assert np.isnan(columns["val_accuracy"][0]) and columns["val_accuracy"][1] == 0.5
