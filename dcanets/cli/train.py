"""``dcanets train``: every ``TrainConfig`` field as a flag, ``--config`` YAML, ``--resume``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from pydantic.fields import FieldInfo

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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_METAVARS = {"integer": "N", "number": "X", "string": "TEXT"}


def _flag_options(info: FieldInfo, schema: Dict[str, Any]) -> Dict[str, Any]:
    """argparse options for one TrainConfig field: values stay text and TrainConfig validates them,
    so a bad flag gets the same message as a bad YAML value (``lr: must be a number, got 'x'``)."""
    default = info.get_default(call_default_factory=True)
    help_text = info.description or ""
    help_text += "" if default is None else f" (default: {default!r})"
    options: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}  # argparse %-formats
    kinds = {s.get("type") for s in schema.get("anyOf", [schema])} - {"null"}
    if kinds == {"object"}:
        return {**options, "type": _kv_arg, "metavar": "K=V,..."}
    if kinds == {"boolean"}:
        return {**options, "action": argparse.BooleanOptionalAction}
    if "enum" in schema:
        return {**options, "choices": schema["enum"]}
    return {**options, "metavar": _METAVARS.get(kinds.pop() if len(kinds) == 1 else "", "VALUE")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; ``--config`` reads a YAML of fields the flags override."""
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (e.g. a search's best.yaml)")
    parser.add_argument("--resume", help="checkpoint (last.pt) or output directory to resume from")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    schema = TrainConfig.model_json_schema()
    for name, info in TrainConfig.model_fields.items():
        prop = schema["properties"][name]
        if "$ref" in prop:  # a nested model (opt_kwargs): its own schema says what kind it is
            prop = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
        parser.add_argument(_flag(name), **_flag_options(info, prop))


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
    values.update({name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)})
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
