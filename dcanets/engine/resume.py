"""What a resumed run may change, and the one line that refuses the rest.

A checkpoint continues the run that wrote it. Its history, its best validation accuracy and the
schedule's position only mean something for the data, split, model, optimizer and schedule it
was trained with: resumed with another ``val_fraction`` or ``seed``, a run validated on images its
first epochs trained on (issue 24: 23 validation images became 898, and best_val_acc rose to
0.92). So a resume may change only :data:`MAY_CHANGE`: how and where the run computes, a
diagnostic, the held-out set evaluated once at the end, and ``epochs``, upward only (the schedule
is then fitted into the new total, see docs/training.md). Every other field must equal the
checkpoint's; a field the checkpoint does not have (written by an older dcanets) must have its
default. The number of data-parallel processes is not a field: a resume may use any number that
divides the global batch, ``batch_size × processes``, which must stay the checkpoint's
(``batch_size`` is per process; see :func:`check_batch`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from dcanets.engine.checkpoint import load_checkpoint
from dcanets.engine.config import TrainConfig

MAY_CHANGE = {
    "epochs": "upward: more epochs continue the run",
    "device": "where it runs",
    "amp": "how it computes",
    "amp_dtype": "how it computes",
    "channels_last": "how it computes",
    "compile": "how it computes",
    "fidelity_every": "a diagnostic: the training steps are the same with or without it",
    "fidelity_reference": "a diagnostic",
    "eval_data": "evaluated once, after the last epoch",
    "output": "where it writes (dcanets train: the folder it resumed from)",
    "workers": "how it computes: every image's augmentation is seeded by the sample, not the worker",
    "batch_size": "per process: with another number of processes, as long as batch_size x processes (the global "
                  "batch) is the checkpoint's",
}


def load(resume: str | Path, cfg: TrainConfig, world_size: int = 1) -> Dict[str, Any]:
    """The checkpoint at ``resume`` (a last.pt or its folder), after :func:`check` against ``cfg``
    and :func:`check_batch` for a run of ``world_size`` processes."""
    ckpt = load_checkpoint(resume)
    saved = ckpt.get("config", {})
    check(saved, int(ckpt.get("epoch", 0)), cfg, str(resume))
    check_batch(saved, int(ckpt.get("world_size", 1)), cfg, world_size, str(resume))
    return ckpt


def check_batch(saved: Mapping[str, Any], saved_world: int, cfg: TrainConfig, world_size: int, source: str) -> None:
    """One ValueError line when the global batch (``batch_size × processes``) differs from the
    checkpoint's: the batches, the schedule's updates per epoch and the lr's meaning would change."""
    before = int(saved.get("batch_size", cfg.batch_size)) * saved_world
    now = int(cfg.batch_size) * world_size
    if now == before:
        return
    fits = "" if before % world_size else f"; with {world_size} process(es) that is batch_size={before // world_size}"
    raise ValueError(f"checkpoint '{source}' was trained with a global batch of {before} (batch_size "
                     f"{saved.get('batch_size')} x {saved_world} process(es)), now {now} (batch_size {cfg.batch_size} "
                     f"x {world_size}); a resumed run keeps it: use a number of processes that divides {before} and "
                     f"batch_size = {before} / processes{fits}")


def check(saved: Mapping[str, Any], epochs_done: int, cfg: TrainConfig, source: str) -> None:
    """One ValueError line when ``cfg`` changes a field a resume must keep, or asks for fewer
    epochs than the checkpoint has run."""
    changed = differences(saved, cfg)
    if changed:
        listed = ", ".join(f"{key} ({old!r}, now {new!r})" for key, old, new in changed)
        raise ValueError(f"checkpoint '{source}' was trained with other values of {listed}; a resumed run keeps "
                         f"them (only {', '.join(MAY_CHANGE)} may change; epochs only upward, batch_size with the "
                         "global batch kept): drop those settings, or start a new run in another output folder")
    if cfg.epochs < epochs_done:
        raise ValueError(f"epochs={cfg.epochs} is below the {epochs_done} epochs checkpoint '{source}' has run; "
                         f"pass epochs >= {epochs_done} (more epochs continue the run)")


def differences(saved: Mapping[str, Any], cfg: TrainConfig) -> List[Tuple[str, Any, Any]]:
    """``(field, checkpoint's value, cfg's value)`` of each field a resume may not change."""
    now = cfg.to_dict()
    out = []
    for key, info in TrainConfig.model_fields.items():
        if key in MAY_CHANGE:
            continue
        old = saved[key] if key in saved else info.get_default(call_default_factory=True)
        if old != now[key]:
            out.append((key, old, now[key]))
    return out


__all__ = ["MAY_CHANGE", "check", "check_batch", "differences", "load"]
