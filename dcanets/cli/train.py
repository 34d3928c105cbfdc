"""``dcanets train``: every ``TrainConfig`` field as a flag, ``--config`` YAML, ``--resume``."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict

from dcanets.engine.checkpoint import load_checkpoint
from dcanets.engine.config import TrainConfig
from dcanets.engine.loop import train


def parse_kv(text: str) -> Dict[str, Any]:
    """``'rho=0.01,lam=10'`` or a JSON object -> dict (values parsed as YAML scalars)."""
    import yaml

    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad JSON in '{text}': {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got '{text}'")
        return value
    out: Dict[str, Any] = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad key=value item '{item}' in '{text}'; use e.g. 'rho=0.01,lam=10'")
        out[key.strip()] = yaml.safe_load(val.strip())
    return out


def _kv_arg(text: str) -> Dict[str, Any]:
    try:
        return parse_kv(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


HELP = {
    "model": "timm model name", "model_kwargs": "extra timm.create_model kwargs",
    "data": "digits | synthetic[:N] | image-folder dir or .tar | torchvision CIFAR/MNIST dir",
    "eval_data": "held-out image-folder dir or .tar evaluated at the end",
    "val_fraction": "fraction held out for validation (fixed-seed split)",
    "split_seed": "seed of the train/validation split (default: --seed); fix it to compare seeds on one split",
    "val_limit": "at most this many validation images (default: in proportion to --limit)",
    "warmup_epochs": "linear lr warm-up length in epochs (may be fractional)",
    "limit": "use at most this many training images", "opt": "timm optimizer registry name",
    "opt_kwargs": "extra optimizer kwargs, e.g. 'rho=0.01,lam=10' or JSON",
    "sched": "cosine | step | none", "device": "auto | cpu | cuda[:N]",
    "amp": "mixed precision (CUDA only)", "augment": "pad-4 crop + flip (default: on for RGB data)",
    "output": "directory for last.pt and metrics.json",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; ``--config`` reads a YAML of fields the flags override."""
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (e.g. a search's best.yaml)")
    parser.add_argument("--resume", help="checkpoint (last.pt) or output directory to resume from")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    types = {"float": float, "int": int, "str": str}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{HELP.get(f.name, '')} (default: {default!r})".strip()
        if f.name in ("model_kwargs", "opt_kwargs"):
            parser.add_argument(_flag(f.name), type=_kv_arg, default=argparse.SUPPRESS, metavar="K=V,...",
                                help=help_text)
        elif f.name in ("amp", "augment"):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            kind = str(f.type).replace("Optional[", "").rstrip("]")
            parser.add_argument(_flag(f.name), type=types.get(kind, str), default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import yaml

    values: Dict[str, Any] = {}
    if getattr(args, "resume", None):  # a resumed run starts from the config it was written with
        values.update(load_checkpoint(args.resume).get("config", {}))
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid YAML in '{path}': {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"'{path}' must hold a mapping of TrainConfig fields")
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cfg = config_from_args(args)
    show = not args.no_progress
    bar = tqdm(total=cfg.epochs, desc=f"{cfg.model} {cfg.opt}", unit="epoch", disable=not show)

    def on_epoch(m: Dict[str, Any]) -> None:
        bar.n = m["epoch"]
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", acc=f"{m['train_acc']:.3f}",
                        val_acc=f"{m['val_acc']:.3f}", lr=f"{m['lr']:.2g}")
        bar.refresh()

    try:
        final = train(cfg, on_epoch=on_epoch, resume=args.resume, progress=show)
    except BaseException:
        bar.leave = False  # the error line is what the user needs to see
        raise
    finally:
        bar.close()
    final.pop("history", None)
    print(json.dumps(final, indent=2, default=float))
    return 0
