"""``dcanets train``: every ``TrainConfig`` field as a flag, ``--config`` YAML, ``--resume``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

from pydantic.fields import FieldInfo

from dcanets import safe_yaml
from dcanets.cli import tracking
from dcanets.cli.flags import Joined, KeyValues, field_flags
from dcanets.engine.config import TrainConfig
from dcanets.engine.divergence import describe
from dcanets.validation import yaml_problem


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_METAVARS = {"integer": "N", "number": "X", "string": "TEXT", "array": "X,Y,..."}  # arrays: comma-separated


def _flag_options(info: FieldInfo, schema: Dict[str, Any]) -> Dict[str, Any]:
    """argparse options for one TrainConfig field: values stay text and TrainConfig validates them,
    so a bad flag gets the same message as a bad YAML value (``lr: must be a number, got 'x'``)."""
    default = info.get_default(call_default_factory=True)
    help_text = info.description or ""
    help_text += "" if default is None else f" (default: {default!r})"
    options: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}  # argparse %-formats
    kinds = {s.get("type") for s in schema.get("anyOf", [schema])} - {"null"}
    if kinds == {"object"}:  # timm's `--model-kwargs a=1 b=2`, or `a=1,b=2`, or JSON
        return {**options, "nargs": "+", "action": KeyValues, "metavar": "K=V"}
    if kinds == {"array"}:  # timm's `--decay-milestones 30 60`, or `30,60`
        return {**options, "nargs": "+", "action": Joined, "metavar": "X"}
    if kinds == {"boolean"}:
        return {**options, "action": argparse.BooleanOptionalAction}
    if "enum" in schema:
        return {**options, "choices": schema["enum"]}
    return {**options, "metavar": _METAVARS.get(kinds.pop() if len(kinds) == 1 else "", "VALUE")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; ``--config`` reads a YAML of fields the flags override."""
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (e.g. a search's best.yaml)")
    parser.add_argument("--resume", help="checkpoint (last.pt) or output directory to resume from")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: one line per epoch (epoch, losses, accuracies, lr, seconds)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine (torch.distributed.run, DDP; one per GPU, or "
                             "per CPU core): each takes --batch-size images per step, so the global batch is "
                             "batch_size x N; --lr is the global batch's, not scaled (default: 1)")
    tracking.add_arguments(parser)  # MLflow, when asked
    schema = TrainConfig.model_json_schema()
    for name, info in TrainConfig.model_fields.items():
        prop = schema["properties"][name]
        if "$ref" in prop:  # a nested model (opt_kwargs): its own schema says what kind it is
            prop = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
        parser.add_argument(*field_flags(name, TrainConfig.model_fields), **_flag_options(info, prop))


def check(args: argparse.Namespace) -> None:
    """The flags and ``--config`` as a TrainConfig, before torch is imported: a wrong value is one
    line at once (a ``--resume`` checkpoint is read in ``run``)."""
    if not getattr(args, "resume", None):
        config_from_args(args)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import yaml

    values: Dict[str, Any] = {}
    if getattr(args, "resume", None):  # a resumed run starts from the config it was written with
        from dcanets.engine.checkpoint import load_checkpoint
        from dcanets.engine.export import trusted_spec

        saved = load_checkpoint(args.resume).get("config", {})
        trusted_spec({"model": saved.get("model"), "kwargs": saved.get("model_kwargs")}, f"checkpoint '{args.resume}'")
        values.update({k: v for k, v in saved.items() if k != "output"})  # it writes where it is now
    if getattr(args, "config", None):
        path = Path(args.config)
        if path.is_dir():
            raise ValueError(f"config file '{path}' is a directory; pass a YAML file of TrainConfig fields")
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        try:
            loaded = safe_yaml.load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid YAML in '{path}': {yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"'{path}' must hold a mapping of TrainConfig fields")
        loaded.pop("tracking", None)  # MLflow settings, not a field: dcanets.cli.tracking reads them
        values.update(loaded)
    values.update({name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)})
    if getattr(args, "resume", None):  # into the folder it resumed from, never the checkpoint's old output
        from dcanets.engine.rundir import resume_output

        values["output"] = resume_output(args.resume, values.get("output"))
    elif not values.get("output"):  # a run is always saved: resumable, and its metrics kept
        model = values.get("model") or TrainConfig.model_fields["model"].default
        values["output"] = str(default_output(str(model)))
    return TrainConfig.from_dict(values)


def default_output(model: str) -> Path:
    """``runs/train/<model>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` if taken), for a run started without ``--output``."""
    import re
    import time

    from dcanets.engine.rundir import unused

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("._") or "model"
    return unused(Path("runs") / "train" / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}")  # -2, -3 if taken


def epoch_line(m: Dict[str, Any], epochs: int) -> str:
    """One line per finished epoch: ``epoch 3/10  train_loss 0.512  train_acc 0.843 ... 4.1s``."""
    return (f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  lr {m['lr']:.3g}  {m['epoch_seconds']:.1f}s")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from tqdm import tqdm

    from dcanets.engine import distributed, launch
    from dcanets.engine.atomic import DiskFull
    from dcanets.engine.loop import train
    from dcanets.engine.rundir import resume_hint

    cfg = config_from_args(args)
    if getattr(args, "nproc", 1) != 1 and not distributed.launched():
        return run_processes(cfg, args)
    main = distributed.is_main_process()  # under torchrun: rank 0 alone prints and logs to MLflow
    show = not args.no_progress and main
    bar: Optional[tqdm] = None  # made at the first batch, when the number of batches is known
    done: Dict[str, int] = {"epoch": 0}

    def on_batch(epoch: int, batch: int, batches: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=cfg.epochs * batches, initial=(epoch - 1) * batches + batch - 1, unit="batch",
                       desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True, file=sys.stderr)
        elif batch == 1:
            bar.set_description_str(f"epoch {epoch}/{cfg.epochs}", refresh=False)
        bar.update(1)

    def on_epoch(m: Dict[str, Any]) -> None:
        done["epoch"] = m["epoch"]
        if not main:
            return
        line = epoch_line(m, cfg.epochs)
        if bar is not None:
            bar.set_postfix(loss=f"{m['train_loss']:.3f}", val_acc=f"{m['val_acc']:.3f}", refresh=False)
            bar.write(line, file=sys.stderr)  # above the bar, which stays at the bottom
        else:
            print(line, file=sys.stderr, flush=True)

    tracker = tracking.tracker_for(args, cfg) if main else None  # None unless asked
    try:
        with tracking.tracked(tracker) as track:
            final = train(cfg, on_epoch=track.on_epoch(on_epoch), resume=args.resume, progress=show,
                          on_batch=on_batch if show else None)
            track.finish(final)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if not main:
            return 130
        checkpoint = Path(str(cfg.output)) / "last.pt"
        if checkpoint.is_file():
            print(f"dcanets train: interrupted after epoch {done['epoch'] or 'of the checkpoint'}; resume with: "
                  f"dcanets train --resume {shlex.quote(str(cfg.output))}", file=sys.stderr)
        else:
            print("dcanets train: interrupted before the first epoch ended; no checkpoint to resume from",
                  file=sys.stderr)
        if tracker is not None:
            print(f"dcanets train: {tracker.summary_line()}", file=sys.stderr)
        return 130
    except BaseException as exc:
        if bar is not None:
            bar.leave = False  # the error line is what the user needs to see
            bar.close()
        launch.record_failure(exc)  # under torch's launcher: this rank's error, for its one-line report
        if isinstance(exc, DiskFull):  # the last complete checkpoint is intact: say so, and how to continue
            if main:
                print(f"dcanets train: error: {exc}; {resume_hint(cfg.output or '')}", file=sys.stderr)
            return 2
        raise
    if bar is not None:
        bar.close()
    if not main:
        return 0
    final.pop("history", None)
    print(json.dumps(final, indent=2, default=float))
    if final.get("diverged"):  # a failure: never reported as a run that ended well
        print(f"dcanets train: error: the run {describe(final)}; lower --lr (it was {cfg.lr:g}) or add "
              f"--warmup-epochs; its metrics.json and last.pt are in {cfg.output}", file=sys.stderr)
        return 1
    print(f"dcanets train: saved last.pt and metrics.json in {cfg.output}", file=sys.stderr)
    if tracker is not None:
        print(f"dcanets train: {tracker.summary_line()}", file=sys.stderr)
    return 0


def run_processes(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """``--nproc N``: the checked config (its output folder fixed here, once) trained by N ranks of
    ``dcanets train`` started through torch.distributed.run; one line names a rank that failed.
    MLflow settings go to the ranks, and rank 0 alone logs."""
    import sys
    import tempfile

    import yaml

    from dcanets.engine import launch
    from dcanets.engine.resume import load as resumed_checkpoint

    launch.check_nproc(cfg, args.nproc)
    if args.resume:  # the global batch of the checkpoint, before any process starts
        resumed_checkpoint(args.resume, cfg, args.nproc)
    with tempfile.TemporaryDirectory(prefix="dcanets-nproc-") as tmp:
        config = Path(tmp) / "config.yaml"
        section = tracking.section(args)
        config.write_text(yaml.safe_dump({**cfg.to_dict(), **({"tracking": section} if section else {})},
                                         sort_keys=False))
        worker = ["train", "--config", str(config)] + (["--resume", str(args.resume)] if args.resume else [])
        worker += ["--no-progress"] if args.no_progress else []
        try:
            return launch.launch(args.nproc, worker + tracking.flags(args))
        except RuntimeError as exc:
            print(f"dcanets train: error: {exc}", file=sys.stderr)
            return 1
