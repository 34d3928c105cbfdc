"""Checkpoints that resume exactly: model, optimizer, schedule, scaler and every RNG state.

Writes are atomic (:mod:`dcanets.engine.atomic`: a temporary file renamed into place), so a run
killed mid-write, or one that fills the disk, leaves the previous checkpoint readable. Reads use
``torch.load(weights_only=True)``: a checkpoint holds only tensors and plain Python data (numpy's
RNG state is stored as a tensor for that reason), so a crafted ``last.pt`` passed to ``--resume``
cannot run code; it is refused with one line.
"""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from dcanets.engine import atomic


def rng_state() -> Dict[str, Any]:
    """Every RNG a run draws from, in types ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_file(path: str | Path) -> Path:
    """The ``last.pt`` of ``path`` (the file, or the run folder holding it); one line if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; pass a last.pt or the run's output directory")
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    path = checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        if not blocked:  # not a pickle torch can read at all
            raise ValueError(f"cannot read checkpoint '{path}': not a torch checkpoint") from None
        raise ValueError(f"refusing to load checkpoint '{path}': it holds objects other than tensors and plain "
                         f"data, which could run code ({blocked[0]}); only resume from checkpoints dcanets "
                         "wrote") from None
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint '{path}': {type(exc).__name__}: {exc}") from None


def save(obj: Dict[str, Any], path: Path) -> None:
    atomic.torch_save(obj, path)


def write_json(path: Path, obj: Any) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


