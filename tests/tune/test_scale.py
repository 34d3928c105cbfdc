"""Search scale (issue 23, item 4) without a search: the MLflow writer's bounded queue and its
failures, which checkpoints the ranking keeps, the checkpoint keeper deleting only what an
uploaded experiment snapshot no longer names, and curves.png at many trials. The same features in
a real search: tests/tune/test_search.py (search_end_to_end) and benchmarks/search_scale.py."""
from __future__ import annotations

import json
import shutil
import threading
from types import SimpleNamespace

import pytest


# ------------------------------------------------------------------------------ the writer
def test_the_writers_queue_is_bounded_the_driver_waits_for_the_oldest_write():
    from dcanets.tune.writer import Writer

    writer = Writer(limit=3)
    held = threading.Event()
    order = []
    writer.submit("held", held.wait, 30)
    writer.submit("one", order.append, 1)
    writer.submit("two", order.append, 2)
    fourth = threading.Thread(target=writer.submit, args=("three", order.append, 3))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive() and writer.backlog == 3  # full: the fourth write waits, nothing piles up
    held.set()
    fourth.join(30)
    assert not fourth.is_alive() and writer.backlog <= 3
    writer.shutdown()
    assert order == [1, 2, 3] and writer.backlog == 0 and writer.failures == 0  # in order, all written


def test_a_failed_write_is_reported_and_counted_and_the_next_ones_still_run(capsys):
    from dcanets.tune.writer import Writer

    writer = Writer()
    done = []

    def refused():
        raise OSError("store refused")

    writer.submit("epoch 1 of trial a", refused)
    writer.submit("epoch 2 of trial a", done.append, 2)
    writer.drain()
    assert done == [2] and writer.failures == 1
    assert writer.first_failure == "epoch 1 of trial a: OSError: store refused"
    assert "not written to MLflow: epoch 1 of trial a: OSError: store refused" in capsys.readouterr().err
    writer.shutdown()


def test_the_tracker_reports_failed_writes_on_the_parent_run_before_ending_it(tmp_path, write_config, capsys):
    from test_callbacks import make_search, trial
    from tune_files import runs_of

    from dcanets.tune.tracking import FAILED_WRITES, SearchTracker

    _, state = make_search(tmp_path, "s", write_config, tracking=True)
    tracker = SearchTracker(state)
    tracker.start({"train.lr": 0.1}, state.folder / "config.yaml", {"name": state.folder.name})
    a = trial("a", lr=0.1)
    tracker.on_trial_start(0, [], a)
    real = tracker.client.log_batch

    def flaky(run_id, metrics=(), **kwargs):
        if metrics:
            raise ConnectionError("server gone")
        return real(run_id, metrics=metrics, **kwargs)

    tracker.client.log_batch = flaky
    tracker.on_trial_result(0, [], a, {"epoch": 1, "val_acc": 0.5})
    tracker.on_trial_complete(0, [], a)
    tracker.close("FINISHED")
    _, (parent,), (child,) = runs_of(state.tracking_uri)
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert parent.data.tags[FAILED_WRITES].startswith("1 MLflow write(s) failed, the first: epoch 1 of trial a")
    assert "1 MLflow write(s) failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ which checkpoints stay
def test_the_ranking_keeps_the_best_k_ended_trials_and_never_the_diverged():
    from dcanets.tune.retention import Ranking

    ranking = Ranking("val_acc", "max", keep=2)

    def run(trial_id, values, errored=False, order=0, loss=1.0):
        for epoch, v in enumerate(values, 1):
            ranking.observe(trial_id, {"epoch": epoch, "val_acc": v, "train_loss": loss})
        return ranking.end(trial_id, f"/s/{trial_id}/checkpoint_000001", order, errored)

    assert run("a", [0.5, 0.7], order=0) == []
    assert run("b", [0.9, 0.6], order=1) == []  # its best epoch counts, not its last
    assert run("c", [0.6], order=2) == ["/s/c/checkpoint_000001"]  # third best of three
    assert run("d", [0.95], order=3) == ["/s/a/checkpoint_000001"]  # a better one pushes the worst kept out
    assert run("e", [0.99], order=4, loss=float("nan")) == ["/s/e/checkpoint_000001"]  # diverged: never ranked
    assert run("f", [0.8], order=5, errored=True) == ["/s/f/checkpoint_000001"]  # crashed: ranked by its values
    assert ranking.kept_trials() == ["d", "b"]
    restored = Ranking("val_acc", "max", keep=2)
    restored.restore(json.loads(json.dumps(ranking.state())))  # through Tune's snapshot
    assert restored.kept_trials() == ["d", "b"]

    everything = Ranking("val_loss", "min", keep=None)
    for i in range(5):
        everything.observe(f"t{i}", {"epoch": 1, "val_loss": float(i)})
        assert everything.end(f"t{i}", f"/s/t{i}/checkpoint_000000", i) == []


def test_keep_best_is_a_section_of_the_search_file(tmp_path, write_config):
    from dcanets.tune import schema
    from dcanets.tune.retention import KEEP_BEST

    assert schema.load(write_config(tmp_path)).checkpoints.keep_best == KEEP_BEST
    assert schema.load(write_config(tmp_path, checkpoints={"keep_best": 2})).checkpoints.keep_best == 2
    path = write_config(tmp_path)
    path.write_text(path.read_text() + "checkpoints: {keep_best: null}\n")  # every trial's
    assert schema.load(path).checkpoints.keep_best is None
    with pytest.raises(ValueError, match="checkpoints.keep_best"):
        schema.load(write_config(tmp_path, checkpoints={"keep_best": 0}))


def test_the_keeper_deletes_only_what_an_uploaded_snapshot_no_longer_names(tmp_path, write_config):
    """Nothing is deleted until three snapshots were seen on the storage (the one that no longer
    names the folder is then complete); the best trial's last checkpoint and a running trial's
    latest always stay."""
    from dcanets.tune import schema
    from dcanets.tune.checkpoints import MARKER, CheckpointKeeper
    from dcanets.tune.storage import Location

    spec = schema.load(write_config(tmp_path, checkpoints={"keep_best": 1}))
    folder, staging = tmp_path / "search", tmp_path / "staging"
    paths = {name: folder / f"trial_{name[0]}" / f"checkpoint_00000{name[1]}" for name in ("a0", "a1", "b0", "c0")}
    for path in paths.values():
        path.mkdir(parents=True)
        (path / "last.pt").write_bytes(b"w")
    keeper = CheckpointKeeper(spec)
    keeper.bind(SimpleNamespace(location=Location.local(folder)))
    trials = {t: SimpleNamespace(trial_id=t, checkpoint=None, storage=SimpleNamespace(
        experiment_driver_staging_path=str(staging))) for t in "abc"}
    for t, values in (("a", [0.9, 0.95]), ("b", [0.5]), ("c", [0.1])):
        keeper.on_trial_start(0, [], trials[t])
        for epoch, v in enumerate(values):
            keeper.on_trial_result(0, [], trials[t], {"epoch": epoch + 1, "val_acc": v})
            keeper.on_checkpoint(0, [], trials[t], SimpleNamespace(path=str(paths[f"{t}{epoch}"])))
        if t != "c":  # c is still running
            keeper.on_trial_complete(0, list(trials.values()), trials[t])

    def exists():
        return {name for name, path in paths.items() if path.exists()}

    for _ in range(3):  # snapshots taken, none of them uploaded yet
        keeper.get_state()
        assert exists() == {"a0", "a1", "b0", "c0"}
    for _ in range(3):  # each uploaded before the next is taken
        shutil.copy(staging / MARKER, folder / MARKER)
        keeper.get_state()
    keeper.purge()
    assert exists() == {"a1", "c0"}  # the best trial's last checkpoint, the running trial's latest
    assert sorted(keeper.deleted) == sorted(str(paths[n]) for n in ("a0", "b0"))


# ------------------------------------------------------------------------------ curves.png
def test_curves_of_many_trials_draw_the_best_as_lines_and_the_rest_as_a_density(tmp_path, write_config,
                                                                                  closed_figures):
    from matplotlib.collections import QuadMesh

    from dcanets.tune import report, schema
    from dcanets.tune.curves import TOP
    from dcanets.tune.state import TrialResult

    figures = closed_figures
    spec = schema.load(write_config(tmp_path))
    trials = [TrialResult(f"t{i:03d}", "TERMINATED", {"lr": 0.01 * (i + 1)},
                          tuple({"epoch": e, "val_acc": i / 100 + e / 1000, "train_loss": 2.0 / (e + i)}
                                for e in (1, 2, 3)), best=i / 100 + 0.003) for i in range(60)]
    report.plot_curves(trials, spec, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    metric_ax = figures[0].axes[0]
    labels = [line.get_label() for line in metric_ax.get_lines()]
    drawn = [label.split()[0] for label in labels if not label.startswith("the other")]
    assert drawn == [f"t{i:03d}" for i in range(59, 59 - TOP, -1)]  # the best TOP, best first
    assert any(label.startswith(f"the other {60 - TOP}") for label in labels)  # the rest: their median ...
    assert any(isinstance(c, QuadMesh) for c in metric_ax.collections)  # ... and their density


def test_a_gang_trials_reported_checkpoint_is_ranked_and_deleted_like_the_others(tmp_path, write_config):
    """A gang trial (Ray Train inside the Tune trial) registers no Tune checkpoint: its reports carry
    Ray Train's checkpoint path, which the keeper ranks and deletes all the same."""
    from dcanets.tune import schema
    from dcanets.tune.checkpoints import CheckpointKeeper
    from dcanets.tune.storage import Location

    spec = schema.load(write_config(tmp_path, checkpoints={"keep_best": 1}))
    folder = tmp_path / "search"
    keeper = CheckpointKeeper(spec)
    keeper.bind(SimpleNamespace(location=Location.local(folder)))
    paths = {}
    trials = []
    for name, value in (("a", 0.9), ("b", 0.4)):
        paths[name] = folder / "gangs" / name / "checkpoint_2026-01-01_00-00-00.000000"
        paths[name].mkdir(parents=True)
        result = {"epoch": 1, "val_acc": value, "checkpoint_path": str(paths[name])}
        trials.append(SimpleNamespace(trial_id=name, checkpoint=None, last_result=result))
        keeper.on_trial_result(0, trials, trials[-1], result)
        keeper.on_trial_complete(0, trials, trials[-1])
    keeper.get_state()  # Tune's last snapshot, as Tuner.fit ends
    keeper.purge()
    assert paths["a"].exists() and not paths["b"].exists()


def test_the_search_summary_of_thousands_of_trials_reaches_the_parent_run(tmp_path, write_config):
    """One metric per trial on the parent run: more than one MLflow batch (1,000) holds."""
    from test_callbacks import make_search
    from tune_files import runs_of

    from dcanets.tune.tracking import SearchTracker

    _, state = make_search(tmp_path, "s", write_config, tracking=True)
    tracker = SearchTracker(state)
    tracker.start({"train.lr": 0.1}, state.folder / "config.yaml", {"name": state.folder.name})
    tracker.summarize({f"val_acc/t{i}": i / 2500 for i in range(2500)}, {}, [])
    tracker.close("FINISHED")
    _, (parent,), _ = runs_of(state.tracking_uri)
    assert len(parent.data.metrics) == 2500 and parent.data.metrics["val_acc/t2499"] == 2499 / 2500
