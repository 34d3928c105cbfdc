"""The decompositions under DDP: 2 gloo ranks, each with half the batch, step exactly as one
process on the whole batch (dcanets.optim.distributed).

A real process group: ``torch.multiprocessing.spawn`` starts two processes that rendezvous through a
file, wrap the BN-free test net in ``DistributedDataParallel`` and step through
``dcanets.optim.protocol.take_step`` (the engine's step). Without the all-reduce of eq. 17's c each
rank would compute β from its own half (and without the averaged curvature, its own κ and ρ), and
the ranks' weights would leave the single-process ones (they would not even agree with each other).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import timm.optim
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_plain_loop import Net

import dcanets  # noqa: F401  (the decompositions into timm's registry, in every process)
from dcanets.optim import prepare, remember_batch, take_step
from dcanets.optim.distributed import data_parallel

STEPS = 3
WORLD = 2
INF = float("inf")
# (optimizer, kwargs, loss scaled by a GradScaler): the scaler unscales p.grad between the backward
# and the step, and c must follow by the global gradient's factor, not this rank's; "clip": norm
# clipping as the engine's recipe does it (after the unscale), which c must follow too
CASES: List[Tuple[str, Dict[str, Any], Any]] = [
    ("sgd", {"momentum": 0.9}, False),
    ("dcacounter", {"beta_max": INF}, False),                                  # β of eq. 19 from the global c
    ("dcacounter", {"beta_max": INF}, True),
    ("dcacounter", {"beta_max": INF}, "clip"),
    ("dcacounter", {"beta_max": INF, "rho": 0.05}, False),                     # κ measured: global curvature
    ("dcacounter", {"beta_max": INF, "rho": "auto", "rho_every": 1}, False),   # Lanczos on the global Hessian
    ("dcaquasihalf", {}, False),                                               # the fused a + c backward
    ("dcaquasihalf", {"direction": "projection", "rho": "auto", "rho_every": 1}, False),  # t: global norms, κ, ρ
]
CLIP = 0.01  # below every step's gradient norm: the clipping binds


def batch(n: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(model: torch.nn.Module, name: str, kwargs: Dict[str, Any], scaled: Any, x: torch.Tensor, y: torch.Tensor,
        forward: Any = None, parallel: bool = False) -> List[Dict[str, float]]:
    """``STEPS`` steps of the engine's kind; the decomposition's diagnostics after each."""
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    clip = (lambda: _clip(model, opt, scaler)) if scaled == "clip" else None
    needs_closure = prepare(opt, model)
    if parallel:
        data_parallel(opt)
    forward = forward or model
    out = []
    for _ in range(STEPS):
        remember_batch(opt, x, y)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss.detach()

        take_step(opt, closure, needs_closure, scaler, before_step=clip)
        out.append({k: float(v) for k, v in getattr(opt, "diagnostics", {}).items()})
    return out


def _clip(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    assert norm > CLIP


def _rank(rank: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        x, y = batch()
        half = len(y) // WORLD
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        results = {}
        for i, (name, kwargs, scaled) in enumerate(CASES):
            torch.manual_seed(0)
            model = Net()
            ddp = DistributedDataParallel(model)
            diagnostics = run(model, name, kwargs, scaled, x, y, forward=ddp, parallel=True)
            results[i] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, diagnostics)
        model = Net()
        try:  # DDP, but the decomposition not made data parallel (a loop like timm's train.py under torchrun)
            run(model, "dcacounter", {"beta_max": INF}, False, x, y, forward=DistributedDataParallel(model))
            results["unsynced"] = "stepped"
        except ValueError as exc:
            results["unsynced"] = str(exc)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict[int, Any]]:
    """Each rank's weights and diagnostics after ``STEPS`` steps of every case (one spawn for all)."""
    folder = tmp_path_factory.mktemp("ddp")
    out = str(folder / "weights")
    mp.spawn(_rank, args=(f"file://{folder / 'rendezvous'}", out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=[
    "-".join([n, *map(str, k.values())] + ([s if isinstance(s, str) else "scaler"] if s else [])) for n, k, s in CASES])
def test_two_ranks_step_as_one_process_on_the_whole_batch(ranks: List[Dict[int, Any]], case: int) -> None:
    name, kwargs, scaled = CASES[case]
    torch.manual_seed(0)
    model = Net()
    start = copy.deepcopy(model.state_dict())
    x, y = batch()
    single = run(model, name, kwargs, scaled, x, y)
    for rank in ranks:
        weights, diagnostics = rank[case]
        for key, want in model.state_dict().items():
            assert not torch.equal(want, start[key]) or key.endswith("bias")  # the steps moved the weights
            torch.testing.assert_close(weights[key], want, rtol=1e-5, atol=1e-7, msg=f"{name} {kwargs}: {key}")
        for got, want in zip(diagnostics, single):  # β, κ, ρ, t: the global batch's, not a half's
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9), (name, kwargs, k)


@pytest.mark.parametrize("name, kwargs", [("dcaprox", {}), ("dcacounter", {"c": "skip"}),
                                          ("dcaquasihalf", {"direction": "newton"})])
def test_closure_stepped_decompositions_are_refused_in_one_line(name: str, kwargs: Dict[str, Any]) -> None:
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, **kwargs)
    assert prepare(opt, model)
    with pytest.raises(ValueError, match=r"steps with a closure here \(.+\), which evaluates the loss again") as err:
        data_parallel(opt)  # refused before it looks for a process group
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_decomposition_not_made_data_parallel_refuses_to_step_under_ddp(ranks: List[Dict[Any, Any]]) -> None:
    """Each rank's own c would give each rank its own step (DDP averages p.grad only) and the ranks'
    weights would drift apart without a word: every rank refuses in one line instead."""
    for rank in ranks:
        assert rank["unsynced"].startswith("DcaCounter: eq. 17's c is measured on this rank's batch, but 2 "
                                           "data-parallel ranks share each step"), rank["unsynced"]
        assert "\n" not in rank["unsynced"]
