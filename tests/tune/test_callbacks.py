"""The Tune callbacks of a search keep their state per instance: two searches in one process never
share it, and the copies ``Tuner.restore`` unpickles follow the session they are bound to.

Real objects throughout: Ray Tune's ``Trial`` (a stub: no trainable is looked up), MLflow SQLite
stores, search folders made by ``create_search_dir`` with their shared storage. The searches that
run these callbacks under Tune are in ``test_search.py`` and ``test_storage.py``.
"""
from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from dcanets.tune.state import TRIALS


def make_search(tmp_path, name: str, write_config, tracking: bool = False):
    """A search folder of its own (config, output, storage, MLflow store) under ``tmp_path/name``."""
    from dcanets.tune import schema
    from dcanets.tune.search import create_search_dir

    root = tmp_path / name
    root.mkdir()
    cfg = write_config(root, name=name, storage=str(root / "shared"), tracking={"enabled": tracking})
    spec = schema.load(cfg)
    return spec, create_search_dir(spec, root / "out")


def trial(trial_id: str, **config):
    from ray.tune.experiment import Trial

    return Trial("dcanets_probe", config=config, trial_id=trial_id, stub=True)


def test_two_searches_callbacks_do_not_share_state(tmp_path, write_config):
    from dcanets.tune.callbacks import Outcomes, ProgressLines, StateCopies, bind_session

    (spec1, one), (spec2, two) = make_search(tmp_path, "one", write_config), make_search(tmp_path, "two", write_config)
    two.finish_session(50.0, "KILLED", ["earlier"])  # the second search is a resumed one
    first = [ProgressLines(spec1), Outcomes(), StateCopies()]
    second = [ProgressLines(spec2), Outcomes(), StateCopies()]
    bind_session(first, one)
    bind_session(second, two)
    for callbacks in (first, second):
        callbacks[0].setup()

    first[1].on_trial_complete(0, [], trial("a"))
    second[1].on_trial_error(0, [], trial("b"))
    assert first[1].ended == {"a"} and second[1].ended == {"earlier", "b"}

    now = time.time()
    assert now - first[0].t0 < 5 and 50 <= now - second[0].t0 < 55  # each clock its own session's

    one.add_trial("a", "run-a")
    two.add_trial("b", "run-b")
    first[2].on_trial_start(0, [], trial("a"))
    second[2].on_trial_start(0, [], trial("b"))
    for state, ids in ((one, ["a"]), (two, ["b"])):
        stored = sorted(p.stem for p in (Path(state.location.path) / TRIALS).iterdir())
        assert stored == ids  # each search's copy in its own storage


def test_trackers_write_off_the_drivers_loop_each_on_its_own_thread(tmp_path, write_config):
    """A trial's MLflow writes (its run, parameters, metrics, end) leave Tune's loop at once and run
    in order on the tracker's own writer thread; ending one search waits for its own writes only."""
    import threading

    from tune_files import runs_of

    from dcanets.tune.tracking import SearchTracker

    searches = [make_search(tmp_path, name, write_config, tracking=True) for name in ("one", "two")]
    trackers = []
    for _, state in searches:
        tracker = SearchTracker(state)
        tracker.start({"train.lr": 0.1}, state.folder / "config.yaml", {"name": state.folder.name})
        trackers.append(tracker)
    held = threading.Event()
    trackers[0].writer.submit("a held write", held.wait, 60)  # the store is slow: the writer thread waits
    a = trial("a", lr=0.1)
    trackers[0].on_trial_start(0, [], a)
    trackers[0].on_trial_result(0, [], a, {"epoch": 1, "val_acc": 0.5, "node_id": "n1"})
    trackers[0].on_trial_complete(0, [], a)
    assert "a" not in searches[0][1].trials and trackers[0].writer.backlog == 4  # the loop did not wait
    trackers[1].close("KILLED")  # the other search ends: it does not wait for the first one's writes
    assert trackers[0].writer.backlog == 4 and "a" not in searches[1][1].trials
    held.set()
    trackers[0].close("FINISHED")
    assert trackers[0].writer.backlog == 0
    client, parents, children = runs_of(searches[0][1].tracking_uri)
    (child,) = children
    assert child.info.status == "FINISHED" and child.data.metrics["val_acc"] == 0.5
    assert child.data.tags["trial_id"] == "a" and child.data.tags["node_id"] == "n1"
    assert json.loads((searches[0][1].folder / TRIALS / "a.json").read_text())["status"] == "FINISHED"


@pytest.mark.parametrize("tracking", [False, True], ids=["without-mlflow", "with-mlflow"])
def test_restored_callbacks_follow_the_session_they_are_bound_to(tmp_path, write_config, tracking):
    """What Tuner.restore does: the callbacks pickled at the start come back, and binding them to
    the resumed session (its folder moved, time spent, trials ended) points them all there."""
    from dcanets.tune.callbacks import Outcomes, ProgressLines, StateCopies, bind_session
    from dcanets.tune.state import SearchState
    from dcanets.tune.tracking import SearchTracker

    spec, started = make_search(tmp_path, "search", write_config, tracking=tracking)
    callbacks = [ProgressLines(spec), Outcomes(), StateCopies()]
    if tracking:
        tracker = SearchTracker(started)
        tracker.start({}, started.folder / "config.yaml", {"name": started.folder.name})
        callbacks.insert(0, tracker)
    bind_session(callbacks, started)
    saved = pickle.dumps(callbacks)

    # the resumed session: another folder with the state saved last, resumed after 30 s of search
    resumed = SearchState.load(started.folder)
    resumed.folder = tmp_path / "elsewhere" / started.folder.name
    resumed.folder.mkdir(parents=True)
    resumed.finish_session(30.0, "KILLED", ["a"])
    restored = pickle.loads(saved)
    bind_session(restored, resumed)
    *rest, progress, outcomes, copies = restored
    progress.setup()
    assert 30 <= time.time() - progress.t0 < 35 and outcomes.ended == {"a"} and copies.state is resumed
    if tracking:
        (tracker,) = rest
        assert tracker.state is resumed and tracker.parent_id == started.parent_run_id
        tracker.on_trial_start(0, [], trial("b", lr=0.2))
        tracker.flush()
        assert (resumed.folder / TRIALS / "b.json").is_file()
        assert not (started.folder / TRIALS / "b.json").exists()  # the folder it was started in
        tracker.close("KILLED")
