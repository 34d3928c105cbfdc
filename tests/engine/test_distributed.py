"""Data-parallel training (dcanets.engine.distributed): the rank slices of the one-process batch
order, two real gloo ranks that train as one process on their concatenated batches and resume
with another world size, and ``dcanets train --nproc`` through torch.distributed.run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.multiprocessing as mp
from engine_runs import numbers

from dcanets import cli
from dcanets.engine import TrainConfig, launch, train
from dcanets.engine.data import random_crop_flip
from dcanets.engine.distributed import batch_count, epoch_order, rank_order


# ----------------------------------------------------------------------------- the batch order
@pytest.mark.parametrize("n, drop_last", [(100, True), (100, False), (103, False), (97, False), (8, False)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_ranks_slices_concatenated_are_the_one_process_batches(n: int, drop_last: bool, world: int) -> None:
    b = 4  # per rank: the global batch is 4 x world
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    parts = [rank_order(order, b, r, world) for r in range(world)]
    steps = [batch_count(n, b, r, world, even=True, drop_last=drop_last) for r in range(world)]
    assert len(set(steps)) == 1  # every rank takes part in every step (DDP's collectives)
    glob = b * world
    for k in range(steps[0]):
        step = torch.cat([p[k * b:(k + 1) * b] for p in parts])
        whole = order[k * glob:(k + 1) * glob]
        # the global batch; a last partial one cut to a multiple of the world size (equal slices)
        assert torch.equal(step, whole[:len(whole) // world * world])
        assert len({len(p[k * b:(k + 1) * b]) for p in parts}) == 1
    assert steps[0] == (n // glob if drop_last else n // glob + (n % glob >= world))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_order_gives_every_image_to_one_rank(world: int) -> None:
    parts = [epoch_order(23, torch.Generator(), False, 4, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), torch.arange(23))
    assert [batch_count(23, 4, r, world, even=False, drop_last=False) for r in range(world)] == \
           [-(-len(p) // 4) for p in parts]


def test_a_ranks_crops_are_those_of_its_rows_of_the_global_batch() -> None:
    x = torch.randint(0, 255, (8, 3, 6, 6), dtype=torch.uint8)
    whole = random_crop_flip(x, torch.Generator().manual_seed(5))
    parts = [random_crop_flip(x[r * 2:(r + 1) * 2], torch.Generator().manual_seed(5), of=(r, 4)) for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[1], random_crop_flip(x[2:4], torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------- two gloo ranks
def tiny(**kw: Any) -> TrainConfig:
    """A BatchNorm-free net: its gradient on a batch is the mean of the slices' gradients."""
    base = dict(model="multibranch_mlp_1h", data="digits", limit=256, batch_size=32, epochs=2, lr=0.05,
                augment=True, device="cpu")
    return TrainConfig(**{**base, **kw})


def _rank(rank: int, rendezvous: str, out: str, cfg: Dict[str, Any], stop_after: int) -> None:
    """One rank, its process group started here (as Ray Train starts it): train, or stop after
    ``stop_after`` epochs as an interrupted run does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)

    def stop(m: Dict[str, Any]) -> None:
        if m["epoch"] == stop_after:
            raise KeyboardInterrupt

    try:
        final = train(TrainConfig(**cfg), on_epoch=stop if stop_after else None, progress=False)
        torch.save({"history": numbers(final["history"]), "world_size": final["world_size"]}, f"{out}.{rank}")
    except KeyboardInterrupt:
        pass
    finally:
        dist.destroy_process_group()


def two_ranks(tmp_path: Path, cfg: TrainConfig, stop_after: int = 0) -> List[Dict[str, Any]]:
    tmp_path.mkdir()
    out = tmp_path / "result"
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(out), cfg.to_dict(), stop_after), nprocs=2)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)] if not stop_after else []


def close(got: List[Dict[str, Any]], want: List[Dict[str, Any]]) -> None:
    """Equal histories up to the order of floating-point sums (DDP averages the two halves)."""
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want]
    for g, w in zip(got, want):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (key, g, w)


@pytest.mark.slow
def test_two_ranks_train_as_one_process_on_the_global_batch_and_resume_with_one(tmp_path: Path) -> None:
    """Batches of 16 on each of 2 ranks = batches of 32 in one process: the same images, crops,
    losses and accuracies (summed over both ranks), epoch by epoch. A run of 2 ranks stopped after
    epoch 1 resumes in one process (batch 32) exactly where the one-process run was."""
    one = train(tiny(), progress=False)
    ranks = two_ranks(tmp_path / "a", tiny(batch_size=16))
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2  # every rank reports the global numbers
    close(ranks[0]["history"], numbers(one["history"]))

    run = tmp_path / "run"
    two_ranks(tmp_path / "b", tiny(batch_size=16, output=str(run)), stop_after=1)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["rng_ranks"]) == 2
    resumed = train(tiny(output=str(run)), resume=run, progress=False)
    assert resumed["world_size"] == 1
    close(numbers(resumed["history"]), numbers(one["history"]))
    assert json.loads((run / "metrics.json").read_text())["final"]["world_size"] == 1


def _recipe_rank(rank: int, rendezvous: str, out: str, cfg: Dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        final = train(TrainConfig(**cfg), progress=False)
        torch.save(numbers(final["history"]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_clipping_accumulation_and_ema_train_as_one_process(tmp_path: Path) -> None:
    """dcacounter with norm clipping (binding: 0.05), groups of 2 accumulated batches (the first under
    DDP's no_sync) and a model EMA: 2 ranks of 16 train as one process of 32, and the EMA, updated on
    each rank, validates the same. (That clipping must follow the all-reduce of eq. 17's c is pinned
    by tests/optim/test_data_parallel.py's clip case, where c's share of the step is larger.)"""
    recipe = dict(model="double_resnet_flat", opt="dcacounter", opt_kwargs={"beta_policy": "clamp"}, lr=0.5,
                  clip_grad=0.05, grad_accum_steps=2, model_ema=True, model_ema_decay=0.5, augment=False)
    one = numbers(train(tiny(**recipe), progress=False)["history"])
    assert one[0]["train_loss"] != pytest.approx(one[1]["train_loss"], rel=1e-3)  # the steps moved the weights
    folder = tmp_path / "ranks"
    folder.mkdir()
    out = str(folder / "history")
    mp.spawn(_recipe_rank, args=(f"file://{folder / 'rendezvous'}", out, tiny(batch_size=16, **recipe).to_dict()),
             nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]
    close(ranks[0], one)
    for g, w in zip(ranks[0], one):
        assert g["val_acc_ema"] == pytest.approx(w["val_acc_ema"], rel=1e-4, abs=1e-6)
        assert g["val_loss_ema"] == pytest.approx(w["val_loss_ema"], rel=1e-4, abs=1e-6)


def _folder_rank(rank: int, rendezvous: str, folder: str) -> None:
    """One rank of three runs: into a folder holding a finished run, into a fresh one, and one
    whose rank 0 finds the disk full when it writes last.pt. What each rank saw goes to a file."""
    import errno

    import torch.distributed as dist

    from dcanets.engine import atomic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    seen: Dict[str, Any] = {}
    try:
        for name in ("finished", "fresh", "full"):
            if name == "full" and rank == 0:
                def no_space(path: Path, data: Any) -> None:  # what write_bytes makes of ENOSPC
                    raise atomic.DiskFull(path, OSError(errno.ENOSPC, "No space left on device"))

                atomic.write_bytes = no_space  # type: ignore[assignment]  (this process only)
            try:
                train(tiny(epochs=1, batch_size=16, output=f"{folder}/{name}"), progress=False)
                seen[name] = "trained"
            except Exception as exc:  # noqa: BLE001  (the test compares what each rank raised)
                seen[name] = f"{type(exc).__name__}: {exc}"
        seen["pid"] = os.getpid()
        torch.save(seen, f"{folder}/seen.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_0_alone_claims_the_run_folder_and_its_refusal_or_full_disk_ends_every_rank(tmp_path: Path) -> None:
    """The run folder's lock and checks are rank 0's, for every rank: rank 1 neither refuses a folder
    rank 0 holds nor waits in the next collective when rank 0 refuses (a finished run's folder) or
    cannot write (a full disk): every rank ends with rank 0's one line, in the same exception."""
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "metrics.json").write_text('{"config": {"epochs": 1}, "final": {"epoch": 1}}')
    mp.spawn(_folder_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"seen.{r}", weights_only=True) for r in range(2)]
    assert seen[0]["finished"] == seen[1]["finished"]
    assert seen[0]["finished"].startswith("RunFolderError: output ") and "holds a finished run" in seen[0]["finished"]
    assert seen[0]["fresh"] == seen[1]["fresh"] == "trained"
    holder = json.loads((tmp_path / "fresh" / ".dcanets.lock").read_text())
    assert holder["pid"] == seen[0]["pid"]  # rank 0 held the folder; rank 1 never took the lock
    assert seen[0]["full"] == seen[1]["full"]
    assert seen[0]["full"].startswith(f"DiskFull: no space left on device writing '{tmp_path / 'full' / 'last.pt'}'")
    assert not (tmp_path / "full" / "last.pt").exists()


def test_one_rank_group_wraps_the_model_in_ddp_accumulates_under_no_sync_and_hooks_the_inner_model(
        tmp_path: Path) -> None:
    """A process group of one rank runs the code of N (in this process): the forward goes through
    DistributedDataParallel, the decomposition (attached by itself, or by prepare() given the
    wrapper) hooks the model inside, and the batches of an accumulation group before its last run
    under DDP's no_sync()."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dcanets.engine import loop
    from dcanets.optim import prepare

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        run = loop._Run(tiny(model="double_resnet_flat", opt="dcacounter", opt_kwargs={"beta_policy": "clamp"},
                             grad_accum_steps=2, epochs=1), progress=False)
        assert isinstance(run.parallel, DistributedDataParallel) and run.forward is run.parallel
        inner = run.optimizer
        assert inner._model is run.model and inner.collective is not None
        assert prepare(run.optimizer, run.parallel) is False and inner._model is run.model  # the wrapper unwrapped
        entered = []
        no_sync = run.parallel.no_sync

        def counting() -> Any:
            entered.append(run.num_updates)
            return no_sync()

        run.parallel.no_sync = counting  # type: ignore[method-assign]
        run.train_epoch()
        assert len(entered) == len(run.train_loader) // 2 == run.num_updates  # the first batch of each pair
    finally:
        dist.destroy_process_group()


def test_a_resume_keeps_the_global_batch_with_any_number_of_processes(tmp_path: Path) -> None:
    from dcanets.engine.resume import check_batch

    saved = tiny(batch_size=16).to_dict()
    check_batch(saved, 2, tiny(batch_size=32), 1, "run")  # 16 x 2 = 32 x 1
    check_batch(saved, 2, tiny(batch_size=8), 4, "run")
    with pytest.raises(ValueError, match=r"global batch of 32 \(batch_size 16 x 2 process\(es\)\), now 16 "
                                         r"\(batch_size 16 x 1\).*with 1 process\(es\) that is batch_size=32") as err:
        check_batch(saved, 2, tiny(batch_size=16), 1, "run")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- dcanets train --nproc
def dcanets(*args: str, cwd: Path) -> "subprocess.Popen[str]":
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dcanets", "train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def children(pid: int) -> List[int]:
    """The live processes below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rfind(")") + 2:].split()
                if int(fields[1]) == parent and fields[0] != "Z":
                    found.append(int(entry))
                    todo.append(int(entry))
    return found


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(int(v[5:]) for v in environ if v.startswith(b"RANK="))


@pytest.mark.slow
@pytest.mark.skipif(launch.usable_cpus() < 2, reason="two ranks need two CPU cores")
def test_nproc_2_trains_on_digits_and_rank_0_alone_prints_writes_and_logs(tmp_path: Path) -> None:
    proc = dcanets("--nproc", "2", "--data", "digits", "--limit", "256", "--batch-size", "32", "--epochs", "2",
                   "--model", "cifar_resnet20", "--device", "cpu", "--no-progress", "--output", "run",
                   "--experiment", "ddp", cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert [line.split()[1] for line in err.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    final = json.loads(out)  # one JSON document: rank 0's
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["world_size"] == saved["final"]["world_size"] == 2
    assert saved["config"]["batch_size"] == 32 and final["train_images"] == 256
    assert final["val_acc"] > 0.3  # 10 classes: chance is 0.1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # --experiment alone: the runs' folder's store
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])  # rank 0's, alone
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or launch.usable_cpus() < 2,
                    reason="reads /proc; two ranks need two CPU cores")
def test_a_killed_rank_ends_the_run_with_its_rank_named_and_no_process_left(tmp_path: Path) -> None:
    proc = dcanets("--nproc", "2", "--data", "digits", "--limit", "512", "--batch-size", "16", "--epochs", "100",
                   "--model", "multibranch_mlp_1h", "--device", "cpu", "--no-progress", "--output", "run",
                   cwd=tmp_path)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # rank 0's first epoch line: both ranks are training
            if line.startswith("epoch 1/"):
                break
        workers = children(proc.pid)
        victim = next(pid for pid in workers if _is_worker(pid) and rank_of(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = rest.strip().splitlines()[-1]
    assert proc.returncode == 1
    assert last.startswith(f"dcanets train: error: rank 1 (pid {victim}) was killed by SIGKILL"), last
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)]


def _is_worker(pid: int) -> bool:
    try:
        return b"--config" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def test_nproc_beyond_the_cpus_or_the_data_is_refused_in_one_line_before_any_process(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("a process was started"))
    too_many = str(launch.usable_cpus() + 1)
    for args, message in [
        (["--nproc", too_many], f"--nproc {too_many}: this process may use {launch.usable_cpus()} CPU core(s)"),
        (["--nproc", "2", "--limit", "50"], "--nproc 2: the global batch, batch_size x nproc = 128 x 2 = 256, is "
                                            "larger than the 50 training images"),
        (["--nproc", "2", "--opt", "dcaprox"], "DcaProx steps with a closure here"),
        (["--nproc", "2", "--fidelity-every", "5"], "fidelity_every=5 measures one process's steps"),
        (["--nproc", "2", "--sync-bn"], "sync_bn=True needs CUDA"),
    ]:
        if args[1] == "2" and launch.usable_cpus() < 2:
            continue
        assert cli.main(["train", *args, "--data", "digits", "--device", "cpu", "--output", "run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dcanets train: error: {message}") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
