"""``search.json`` through its one owner, ``SearchState``, and the frozen records of a search's outcome.

The searches that write it for real (MLflow run ids as trials start and end, the time spent,
resumed from a storage elsewhere) are in ``test_search.py`` and ``test_storage.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest

from dcanets.tune.state import STATE, TRIALS, SearchResult, SearchState, TrialRecord, TrialResult
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
    record = json.loads((tmp_path / "search" / TRIALS / "a.json").read_text())
    assert "trials" not in doc and record == {"run_id": "run-a", "node_id": "n1"}  # unset fields are left out
    assert (doc["fit_seconds"], doc["status"], doc["ended_trials"]) == (12.5, "KILLED", ["a"])
    assert "folder" not in doc  # the folder may move (a resume from the storage, elsewhere)
    assert not list((tmp_path / "search").rglob("*.tmp"))  # written to a new file, moved over the old one

    # a key of another dcanets version survives a load and a save, in search.json and in a record
    (tmp_path / "search" / STATE).write_text(json.dumps({**doc, "future": 1}))
    (tmp_path / "search" / TRIALS / "a.json").write_text(json.dumps({"run_id": "run-a", "later": 2}))
    loaded = SearchState.load(tmp_path / "search")
    assert loaded.folder == tmp_path / "search" and loaded.trials["a"].run_id == "run-a"
    assert (loaded.fit_seconds, loaded.status, loaded.ended_trials) == (12.5, "KILLED", ["a"])
    loaded.save()
    assert json.loads((tmp_path / "search" / STATE).read_text())["future"] == 1
    assert json.loads((tmp_path / "search" / TRIALS / "a.json").read_text())["later"] == 2


def test_a_trial_saves_its_own_record_only(tmp_path):
    """A trial starting or ending writes its record's file, not search.json nor the others' records:
    the cost of a trial's bookkeeping does not grow with the trials before it."""
    state = new_state(tmp_path / "search")
    for i in range(50):
        state.add_trial(f"t{i}", f"run-{i}")
    files = [tmp_path / "search" / STATE, *(tmp_path / "search" / TRIALS / f"t{i}.json" for i in range(50))]
    before = {f: f.stat().st_mtime_ns for f in files}
    time.sleep(0.01)
    state.trials["t7"].status = "FINISHED"
    state.save_trial("t7")
    changed = [f.name for f in files if f.stat().st_mtime_ns != before[f]]
    assert changed == ["t7.json"]
    assert SearchState.load(tmp_path / "search").trials["t7"].status == "FINISHED"
    state.save_trial("t7")  # unchanged: not written again
    assert [f.name for f in files if f.stat().st_mtime_ns != before[f]] == ["t7.json"]

    del state.trials["t3"]  # a dropped trial (an orphan run deleted on --resume) loses its file at the next save
    state.save()
    assert not (tmp_path / "search" / TRIALS / "t3.json").exists()
    assert sorted(SearchState.load(tmp_path / "search").trials) == sorted(f"t{i}" for i in range(50) if i != 3)


def test_a_search_json_of_the_earlier_format_loads_and_is_split_at_its_next_save(tmp_path):
    """Searches started before the records had files of their own keep them inside search.json:
    read as before (a record file, where one exists, is newer), written as files at the next save."""
    folder = tmp_path / "search"
    folder.mkdir()
    old = {"config_dir": "/cfg", "config_path": "/cfg/s.yaml", "experiment": "s", "tracking_uri": "u",
           "num_samples": 3, "parent_run_id": "p", "fit_seconds": 4.0, "status": "KILLED", "ended_trials": ["a"],
           "trials": {"a": {"run_id": "run-a", "status": "FINISHED", "checkpoint": "/x/checkpoint_000001"},
                      "b": {"run_id": "run-b", "node_id": "n"}}}
    (folder / STATE).write_text(json.dumps(old))
    state = SearchState.load(folder)
    assert {t: r.run_id for t, r in state.trials.items()} == {"a": "run-a", "b": "run-b"}
    assert state.trials["a"].status == "FINISHED" and state.parent_run_id == "p"
    state.add_trial("c", "run-c")  # a new trial in the resumed session: its own file
    state.trials["b"].status = "FINISHED"
    state.save_trial("b")
    assert SearchState.load(folder).trials["b"].status == "FINISHED"  # the file wins over the copy inside
    state.finish_session(9.0, "FINISHED", ["a", "b", "c"])
    assert "trials" not in json.loads((folder / STATE).read_text())
    assert sorted(p.name for p in (folder / TRIALS).iterdir()) == ["a.json", "b.json", "c.json"]
    again = SearchState.load(folder)
    assert {t: (r.run_id, r.status) for t, r in again.trials.items()} == {
        "a": ("run-a", "FINISHED"), "b": ("run-b", "FINISHED"), "c": ("run-c", None)}
    assert again.trials["a"].checkpoint == "/x/checkpoint_000001"


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
    state.add_trial("a", "run-a")
    state.share()
    assert json.loads((tmp_path / "shared" / "s-1" / STATE).read_text())["storage"] == str(tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / "s-1" / TRIALS / "a.json").read_text()) == {"run_id": "run-a"}
    assert list(SearchState.load(tmp_path / "shared" / "s-1").trials) == ["a"]  # a resume from the storage alone


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
