"""``search.json`` through its one owner, ``SearchState``, and the frozen records of a search's outcome.

The searches that write it for real (MLflow run ids as trials start and end, the time spent,
resumed from a storage elsewhere) are in ``test_search.py`` and ``test_storage.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dcanets.tune.state import STATE, SearchResult, SearchState, TrialRecord, TrialResult
from dcanets.tune.storage import Location


def new_state(folder, **values) -> SearchState:
    folder.mkdir(parents=True, exist_ok=True)
    return SearchState.create(folder, **{"config_dir": "/cfg", "config_path": "/cfg/s.yaml", "experiment": "s",
                                         "tracking_uri": "sqlite:////x/mlflow.db", "num_samples": 2, **values})


def test_saved_state_loads_back_the_same_and_keeps_unknown_keys(tmp_path):
    state = new_state(tmp_path / "search")
    state.add_trial("a", "run-a")
    state.trials["a"].node_id = "n1"
    state.save_trial("a")
    state.finish_session(12.5, "KILLED", ["a"])
    doc = json.loads((tmp_path / "search" / STATE).read_text())
    assert doc["trials"] == {"a": {"run_id": "run-a", "node_id": "n1"}}  # unset fields are left out
    assert (doc["fit_seconds"], doc["status"], doc["ended_trials"]) == (12.5, "KILLED", ["a"])
    assert "folder" not in doc  # the folder may move (a resume from the storage, elsewhere)
    assert not list((tmp_path / "search").glob("*.tmp"))  # written to a new file, moved over the old one

    # a key of another dcanets version survives a load and a save
    (tmp_path / "search" / STATE).write_text(json.dumps({**doc, "future": 1,
                                                         "trials": {"a": {"run_id": "run-a", "later": 2}}}))
    loaded = SearchState.load(tmp_path / "search")
    assert loaded.folder == tmp_path / "search" and loaded.trials["a"].run_id == "run-a"
    assert (loaded.fit_seconds, loaded.status, loaded.ended_trials) == (12.5, "KILLED", ["a"])
    loaded.save()
    again = json.loads((tmp_path / "search" / STATE).read_text())
    assert again["future"] == 1 and again["trials"]["a"]["later"] == 2


@pytest.mark.parametrize("text, what", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "a JSON object was expected, got list"),
    (json.dumps({"config_dir": "/cfg"}), "config_path: Field required"),
    (json.dumps({"config_dir": "/cfg", "config_path": "/c", "experiment": "s", "tracking_uri": "u",
                 "num_samples": 2, "trials": {"a": {"node_id": "n"}}}), "trials.a.run_id: Field required"),
])
def test_a_damaged_state_is_one_line_that_names_the_problem(tmp_path, text, what):
    (tmp_path / STATE).write_text(text)
    with pytest.raises(ValueError) as info:
        SearchState.load(tmp_path)
    assert what in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        SearchState.load(tmp_path / "nothing-here")


def test_the_location_follows_the_storage_and_the_folder(tmp_path):
    state = new_state(tmp_path / "out" / "s-1")
    assert not state.location.shared and state.location.path == str(tmp_path / "out" / "s-1")
    state.move_storage(str(tmp_path / "shared"))
    assert state.location.shared and state.location.path == str(tmp_path / "shared" / "s-1")
    assert SearchState.load(tmp_path / "out" / "s-1").storage == str(tmp_path / "shared")
    state.share()
    assert json.loads((tmp_path / "shared" / "s-1" / STATE).read_text())["storage"] == str(tmp_path / "shared")


def test_results_are_frozen_and_ranked_by_their_finite_best(tmp_path):
    def trial(trial_id, best):
        return TrialResult(trial_id, "TERMINATED", {"lr": 0.1}, ({"epoch": 1},), best=best)

    trials = (trial("low", 0.2), trial("nan", math.nan), trial("high", 0.9), trial("inf", math.inf))
    result = SearchResult("FINISHED", trials, 3.0, Location.local(tmp_path))
    assert [t.trial_id for t in result.ranked("max")] == ["high", "low"]
    assert [t.trial_id for t in result.ranked("min")] == ["low", "high"]
    assert result.best("min").trial_id == "low" and trials[0].epochs == 1
    assert SearchResult("FAILED", (trial("nan", math.nan),), 1.0, Location.local(tmp_path)).best("max") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        trials[0].best = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.status = "KILLED"  # type: ignore[misc]
    assert TrialRecord(run_id="r").model_dump(exclude_none=True) == {"run_id": "r"}
