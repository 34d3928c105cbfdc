"""Learning-rate schedules: timm's schedulers by name, fitted into ``epochs`` and stepped as timm's
train.py steps them, against closed forms and the engine's former LambdaLR; every name trains one
epoch; an interrupted and resumed run has the uninterrupted run's history."""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional

import pytest
import torch
from engine_runs import interrupted_then_resumed, numbers

from dcanets import cli
from dcanets.cli import train as train_cli
from dcanets.engine import TrainConfig, train
from dcanets.engine import loop as engine
from dcanets.engine.config import SCHEDULES, ConfigError

LR, EPOCHS, PER_EPOCH = 0.1, 10, 50  # 10 epochs of 50 updates
UPDATES = EPOCHS * PER_EPOCH


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=LR)


def lr_per_update(metrics: Iterable[Optional[float]] = (), **fields: Any) -> List[float]:
    """The lr each update of a run of ``fields`` uses, the scheduler called as the engine calls it:
    ``step_update`` after every update, ``step(epoch, metric)`` after every epoch."""
    cfg = TrainConfig(lr=LR, epochs=EPOCHS, **fields)
    opt = optimizer()
    sched = engine.build_scheduler(cfg, opt, PER_EPOCH)
    per_epoch = iter(metrics)
    out = []
    for n in range(1, UPDATES + 1):
        out.append(opt.param_groups[0]["lr"])
        sched.step_update(n)
        if n % PER_EPOCH == 0:
            sched.step(n // PER_EPOCH, next(per_epoch, None))
    return out


def legacy(s: int, warm: int, sched: str) -> float:
    """The lr of update ``s`` under the engine's former per-step LambdaLR (before timm's schedulers)."""
    total = UPDATES - warm
    if s < warm:
        return LR * (s + 1) / warm
    t = min(s - warm, total)
    if sched == "cosine":
        return LR * 0.5 * (1.0 + math.cos(math.pi * t / total))
    return LR * 0.1 ** sum(t >= total * m for m in (0.5, 0.75))


def cosine(t: float, length: float) -> float:
    return LR * 0.5 * (1.0 + math.cos(math.pi * t / length))


def test_cosine_without_warmup_is_the_former_schedule():
    new = lr_per_update(sched="cosine")
    assert new == pytest.approx([cosine(s, UPDATES) for s in range(UPDATES)], abs=1e-15)
    assert max(abs(a - legacy(s, 0, "cosine")) for s, a in enumerate(new)) < 1e-15


def test_cosine_warmup_is_timms_ramp_then_the_former_cosine():
    """timm's ramp is warmup_lr + s/W (lr - warmup_lr): with warmup_lr 0 each warm-up update gets
    the lr the former schedule gave the update before (lr/W less); after the warm-up both are equal."""
    warm = PER_EPOCH
    new = lr_per_update(sched="cosine", warmup_epochs=1)
    closed = [LR * s / warm if s < warm else cosine(s - warm, UPDATES - warm) for s in range(UPDATES)]
    assert new == pytest.approx(closed, abs=1e-15)
    diff = [legacy(s, warm, "cosine") - a for s, a in enumerate(new)]
    assert diff[:warm] == pytest.approx([LR / warm] * warm, abs=1e-15)
    assert max(map(abs, diff[warm:])) < 1e-15 and max(map(abs, diff)) == pytest.approx(0.002)
    ramp = lr_per_update(sched="cosine", warmup_epochs=1, warmup_lr=0.01)
    assert ramp[:3] == pytest.approx([0.01, 0.01 + 0.09 / warm, 0.01 + 0.18 / warm])


def test_warmup_prefix_false_spans_the_decay_over_every_update():
    new = lr_per_update(sched="cosine", warmup_epochs=1, warmup_prefix=False)
    assert new[PER_EPOCH:] == pytest.approx([cosine(s, UPDATES) for s in range(PER_EPOCH, UPDATES)], abs=1e-15)


def test_step_decays_at_half_and_three_quarters_one_update_before_the_former_schedule():
    """timm's multistep applies milestone m from update m - 1 on (its historical convention)."""
    warm, total = PER_EPOCH, UPDATES - PER_EPOCH
    new = lr_per_update(sched="step", warmup_epochs=1)
    closed = [LR * s / warm if s < warm else LR * 0.1 ** sum(s - warm + 1 >= total * m for m in (0.5, 0.75))
              for s in range(UPDATES)]
    assert new == pytest.approx(closed, abs=1e-15)
    differ = [s for s in range(warm, UPDATES) if abs(new[s] - legacy(s, warm, "step")) > 1e-15]
    assert differ == [warm + math.ceil(total * 0.5) - 1, warm + math.ceil(total * 0.75) - 1]


def test_step_every_decay_epochs_and_multistep_at_milestones():
    every = lr_per_update(sched="step", decay_epochs=3, decay_rate=0.5)
    assert every == pytest.approx([LR * 0.5 ** (s // (3 * PER_EPOCH)) for s in range(UPDATES)])
    multi = lr_per_update(sched="multistep", decay_milestones="2,5")
    assert multi == pytest.approx([LR * 0.1 ** sum(s + 1 >= m * PER_EPOCH for m in (2, 5)) for s in range(UPDATES)])


def test_cycles_share_the_epochs_and_end_at_min_lr():
    half = UPDATES // 2
    restarts = lr_per_update(sched="cosine", lr_cycle_limit=2, lr_cycle_decay=0.5)
    assert restarts == pytest.approx([0.5 ** (s // half) * cosine(s % half, half) for s in range(UPDATES)])
    longer = lr_per_update(sched="cosine", lr_cycle_limit=2, lr_cycle_mul=2.0)  # cycles of 1/3 and 2/3
    assert [s for s in range(1, UPDATES) if longer[s] > longer[s - 1]] == [math.ceil(UPDATES / 3)]
    cooled = lr_per_update(sched="cosine", cooldown_epochs=2, min_lr=0.001)
    assert cooled[-2 * PER_EPOCH:] == [0.001] * (2 * PER_EPOCH) and cooled[0] == LR


def test_per_epoch_stepping_holds_the_lr_through_each_epoch():
    new = lr_per_update(sched="cosine", sched_on_updates=False)
    assert new == pytest.approx([cosine(s // PER_EPOCH, EPOCHS) for s in range(UPDATES)], abs=1e-15)


def test_constant_and_none_hold_lr_after_the_warmup():
    for name in ("constant", "none"):
        new = lr_per_update(sched=name, warmup_epochs=1)
        assert new == pytest.approx([LR * min(s / PER_EPOCH, 1.0) for s in range(UPDATES)], abs=1e-15)


def test_plateau_counters_survive_a_checkpoint():
    """timm's PlateauLRScheduler.state_dict keeps only ``best``: the patience count would restart."""
    cfg = TrainConfig(lr=LR, epochs=EPOCHS, sched="plateau", patience_epochs=1)
    metrics = [0.5, 0.4, 0.4, 0.4]  # epoch 2 is one bad epoch; epoch 3 the second, so the lr decays

    def run(opt: torch.optim.Optimizer, sched: Any, epochs: range) -> List[float]:
        for epoch in epochs:
            sched.step(epoch + 1, metrics[epoch])
        return [g["lr"] for g in opt.param_groups]

    opt = optimizer()
    whole = engine.build_scheduler(cfg, opt, PER_EPOCH)
    run(opt, whole, range(2))
    state, opt_state = engine.schedule_state(whole, 2 * PER_EPOCH), opt.state_dict()
    assert run(opt, whole, range(2, 3)) == [LR * 0.1]
    resumed_opt = optimizer()
    resumed = engine.build_scheduler(cfg, resumed_opt, PER_EPOCH)
    resumed_opt.load_state_dict(opt_state)
    assert engine.restore_schedule(resumed, state, 2, PER_EPOCH) == 2 * PER_EPOCH
    assert run(resumed_opt, resumed, range(2, 3)) == [LR * 0.1]


def test_a_former_lambdalr_checkpoint_resumes_at_its_step_count():
    cfg = TrainConfig(lr=LR, epochs=EPOCHS, sched="cosine")
    opt = optimizer()
    sched = engine.build_scheduler(cfg, opt, PER_EPOCH)
    assert engine.restore_schedule(sched, {"last_epoch": 125, "base_lrs": [LR]}, 2, PER_EPOCH) == 125
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine(125, UPDATES))


def tiny(**kw: Any) -> TrainConfig:
    base = dict(model="cifar_resnet20", data="digits", limit=96, batch_size=32, epochs=3, lr=0.05)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_trains_an_epoch(name):
    final = train(tiny(epochs=1, sched=name), progress=False)
    assert 0.0 <= final["history"][0]["lr"] <= 0.05 and math.isfinite(final["train_loss"])


@pytest.mark.parametrize("fields, at_epoch", [
    (dict(sched="cosine", warmup_epochs=1), 2),
    (dict(sched="step", warmup_epochs=1), 2),
    (dict(sched="plateau", epochs=4, warmup_epochs=1, patience_epochs=0), 3),  # decays in epoch 4
], ids=["cosine-warmup", "step", "plateau"])
def test_resume_gives_the_uninterrupted_history(tmp_path, fields, at_epoch):
    full = train(tiny(**fields), progress=False)
    resumed = interrupted_then_resumed(tiny(**fields, output=str(tmp_path / "run")), at_epoch=at_epoch)
    assert numbers(resumed["history"]) == numbers(full["history"])
    lrs = [m["lr"] for m in full["history"]]
    assert lrs[at_epoch] < lrs[at_epoch - 1]  # the schedule moved on after the interruption


def test_unknown_names_and_bad_knobs_are_one_line_errors():
    with pytest.raises(ConfigError) as info:
        TrainConfig(sched="linear")
    assert str(info.value) == ("sched: must be one of 'cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', "
                               "'constant' or 'none', got 'linear'")
    for values, message in [
        ({"decay_milestones": "6,3"}, "decay_milestones: must be increasing, got [6, 3]"),
        ({"decay_milestones": "2,x"}, "decay_milestones[1]: must be a number, got 'x'"),
        ({"decay_epochs": 0}, "decay_epochs: must be > 0, got 0"),
        ({"lr_cycle_limit": 0}, "lr_cycle_limit: must be an integer >= 1, got 0"),
        ({"cooldown_epochs": 9, "warmup_epochs": 1}, "cooldown_epochs: must be < epochs - warmup_epochs (9), got 9"),
        ({"sched_on_updates": False, "warmup_epochs": 0.5},
         "warmup_epochs: must be a whole number when the schedule steps per epoch, got 0.5"),
        ({"sched": "plateau", "val_fraction": 0}, "sched: plateau watches a validation metric: needs val_fraction > 0"),
        ({"eval_metric": "top1"}, "eval_metric: must be one of 'val_acc' or 'val_loss', got 'top1'"),
    ]:
        with pytest.raises(ConfigError) as info:
            TrainConfig(**values)
        assert str(info.value) == message


def test_the_knobs_are_train_flags(capsys):
    args = cli.build_parser(["train"]).parse_args(
        ["train", "--sched", "cosine", "--warmup-epochs", "1", "--lr-cycle-limit", "2", "--decay-milestones", "3,6",
         "--no-warmup-prefix", "--min-lr", "1e-4", "--no-sched-on-updates"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.lr_cycle_limit, cfg.decay_milestones, cfg.warmup_prefix, cfg.min_lr, cfg.sched_on_updates) == (
        2, [3.0, 6.0], False, 1e-4, False)
    with pytest.raises(SystemExit) as info:  # argparse's choices: one line listing the names
        cli.main(["train", "--sched", "linear"])
    first = capsys.readouterr().err.splitlines()[0]
    assert info.value.code == 2 and "invalid choice: 'linear'" in first
    assert all(name in first for name in SCHEDULES)
