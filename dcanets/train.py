"""The one training engine: ``dcanets train``, every Ray Tune trial and every reproduction call it.

A model by timm name, an optimizer by timm registry name (the DCA decompositions are registered
there, so ``opt="dcacounter"`` works exactly like ``opt="sgd"``), a schedule, a fixed-seed
train/validation split of a decoded-once data set, checkpoints that resume exactly, and JSON
metrics. CUDA is used when present, with mixed precision; on CPU a fixed seed gives identical
runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dcanets import data as data_mod
from dcanets.dca.optimizers import prepare
from dcanets.plugins import did_you_mean

EpochCallback = Callable[[Dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Everything one training run depends on; a tuner trial is one of these."""

    model: str = "cifar_resnet20"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # num_classes/in_chans come from the data
    data: str = "digits"              # digits | synthetic[:N] | image-folder dir or .tar | torchvision dir
    eval_data: Optional[str] = None   # held-out image-folder dir/tar, evaluated at the end
    val_fraction: float = 0.1
    split_seed: Optional[int] = None  # seed of the train/validation split (None: ``seed``)
    limit: Optional[int] = None       # use at most this many training images (quick runs)
    val_limit: Optional[int] = None   # at most this many validation images (None: in proportion to limit)
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)  # to create_optimizer_v2, e.g. rho, lam
    sched: str = "cosine"             # cosine | step | none
    warmup_epochs: float = 0.0        # linear lr warm-up from ~0, then the schedule over the rest
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # mixed precision, CUDA only
    augment: Optional[bool] = None    # None: crop+flip for RGB data, none for 1-channel data
    output: Optional[str] = None      # directory for last.pt and metrics.json

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """A config from a mapping (a YAML file, a tuner sample); unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown training config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.sched not in ("cosine", "step", "none"):
            raise ValueError(f"unknown schedule '{self.sched}'; use cosine, step or none")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")


# ----------------------------------------------------------------------------- pieces
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _split_seed(cfg: TrainConfig) -> int:
    return cfg.seed if cfg.split_seed is None else int(cfg.split_seed)


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    import timm

    import dcanets  # noqa: F401  (registers plugin models in this process, e.g. a Ray worker)

    if not timm.is_model(cfg.model):
        raise ValueError(f"unknown model '{cfg.model}'{did_you_mean(cfg.model, timm.list_models())}"
                         "; `timm.list_models()` and `dcanets models` list the known names")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **cfg.model_kwargs}
    return timm.create_model(cfg.model, **kwargs)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``create_optimizer_v2`` by registry name; momentum only for optimizers that take it."""
    from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

    import dcanets  # noqa: F401  (registers the decompositions into timm's optimizer registry)

    try:
        info = get_optimizer_info(cfg.opt.lower().split("_")[-1])
    except (ValueError, KeyError):
        raise ValueError(f"unknown optimizer '{cfg.opt}'{did_you_mean(cfg.opt, list_optimizers())}; "
                         "`timm.optim.list_optimizers()` lists the known names") from None
    kwargs: Dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if info.has_momentum:
        kwargs["momentum"] = cfg.momentum
    try:
        return create_optimizer_v2(model, cfg.opt, **kwargs, **cfg.opt_kwargs)
    except TypeError as exc:
        raise ValueError(f"optimizer '{cfg.opt}' rejected its arguments {sorted({**kwargs, **cfg.opt_kwargs})}: {exc}") from None


def _second_order(opt: str) -> bool:
    from timm.optim import get_optimizer_info

    return bool(get_optimizer_info(opt.lower().split("_")[-1]).second_order)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-step LambdaLR: linear warm-up, then cosine to 0, step (x0.1 at 50% and 75%), or constant.

    Warm-up is what lets deep nets start at lr 0.1 (He et al. 2015 warm ResNet-110 up at 0.01);
    the schedule after it spans the remaining steps, so ``epochs`` stays the whole budget.
    """
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(step - warm, total)
        if cfg.sched == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t / total))
        if cfg.sched == "step":
            return 0.1 ** sum(t >= total * m for m in (0.5, 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: data_mod.BatchLoader, amp: bool) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy over ``loader``."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        with torch.autocast(device_type=x.device.type, enabled=amp):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)


# ----------------------------------------------------------------------------- the run
class _Run:
    """One training run's state: built from a config, stepped epoch by epoch, checkpointable."""

    def __init__(self, cfg: TrainConfig, progress: bool) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        seed_everything(cfg.seed)
        train, val = data_mod.load_split(cfg.data, cfg.val_fraction, _split_seed(cfg), cfg.limit,
                                          val_limit=cfg.val_limit, progress=progress)
        if len(train) == 0:
            raise ValueError(f"no training images left in '{cfg.data}' after the validation split")
        self.train_data, self.val_data = train, val
        self.mean, self.std = data_mod.channel_stats(train.images)
        augment = train.in_chans == 3 if cfg.augment is None else bool(cfg.augment)
        bs = int(cfg.batch_size)
        self.train_loader = self._loader(train, bs, shuffle=True, augment=augment,
                                         drop_last=len(train) >= 2 * bs)
        self.val_loader = self._loader(val, max(bs, 256), shuffle=False, augment=False)
        seed_everything(cfg.seed)
        self.model = build_model(cfg, train.num_classes, train.in_chans).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.needs_closure = prepare(self.optimizer, self.model)
        self.create_graph = _second_order(cfg.opt)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        # GradScaler cannot drive closure-stepped optimizers: those run in full precision
        if self.needs_closure:
            self.amp = False
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch, self.best_val_acc, self.history = 0, 0.0, []  # type: ignore[var-annotated]
        self.augment = augment

    def _loader(self, d: data_mod.ImageData, bs: int, **kw: Any) -> data_mod.BatchLoader:
        return data_mod.BatchLoader(d, bs, self.mean, self.std, device=self.device, seed=self.cfg.seed, **kw)

    def train_epoch(self) -> Dict[str, Any]:
        model, opt = self.model, self.optimizer
        model.train()
        self.train_loader.set_epoch(self.epoch)
        self.train_loader.data_seconds = 0.0
        loss_sum, correct, n = 0.0, 0, 0
        t0 = time.perf_counter()
        for x, y in self.train_loader:
            loss, out = self._step(x, y)
            loss_sum += float(loss) * len(y)
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
            self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.epoch += 1
        return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1), "train_seconds": seconds,
                "images_per_s": n / max(seconds, 1e-9), "data_seconds": self.train_loader.data_seconds}

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        model, opt = self.model, self.optimizer
        if self.needs_closure:
            outputs: List[torch.Tensor] = []

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss.backward(create_graph=self.create_graph)
                outputs.append(out.detach())
                return loss.detach()

            loss = opt.step(closure)
            loss = closure() if loss is None else loss  # optimizers that ignore the closure's value
            return loss, outputs[0]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        self.scaler.scale(loss).backward(create_graph=self.create_graph)
        self.scaler.step(opt)
        self.scaler.update()
        return loss.detach(), out.detach()

    def state_dict(self) -> Dict[str, Any]:
        return {"config": self.cfg.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": _rng_state(), "best_val_acc": self.best_val_acc,
                "history": self.history, "classes": self.train_data.classes,
                "mean": self.mean, "std": self.std}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best_val_acc = int(ckpt["epoch"]), float(ckpt["best_val_acc"])
        self.history = list(ckpt["history"])
        _set_rng_state(ckpt["rng"])


def _load_checkpoint(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; pass a last.pt or the run's output directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint '{path}': {exc}") from None


def _save(obj: Dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def train(cfg: TrainConfig, on_epoch: Optional[EpochCallback] = None,
          resume: str | Path | None = None, progress: bool = True) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the final metrics.

    ``on_epoch`` receives after every epoch: epoch (1-based), train_loss, train_acc, val_loss,
    val_acc, lr, epoch_seconds, images_per_s, data_seconds, checkpoint. ``resume`` (a last.pt or
    its directory) restores model, optimizer, scheduler, epoch and RNG so the run continues
    exactly as an uninterrupted one would. ``progress`` shows a bar while a data set is decoded
    (once; later runs read the cache).
    """
    t_start = time.perf_counter()
    run = _Run(cfg, progress)
    if resume is not None:
        ckpt = _load_checkpoint(resume)
        for key in ("model", "model_kwargs", "data"):
            if key in ckpt.get("config", {}) and ckpt["config"][key] != getattr(cfg, key):
                raise ValueError(f"checkpoint '{resume}' was trained with {key}={ckpt['config'][key]!r}, "
                                 f"not {getattr(cfg, key)!r}; resume with the same {key}")
        run.load_state_dict(ckpt)
    out_dir = Path(cfg.output) if cfg.output else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics: Dict[str, Any] = run.history[-1] if run.history else {}
    while run.epoch < cfg.epochs:
        t0 = time.perf_counter()
        stats = run.train_epoch()
        val_loss, val_acc = evaluate(run.model, run.val_loader, run.amp) if len(run.val_data) else (float("nan"), float("nan"))
        run.best_val_acc = max(run.best_val_acc, val_acc) if val_acc == val_acc else run.best_val_acc
        metrics = {"epoch": run.epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                   "val_loss": val_loss, "val_acc": val_acc, "lr": run.optimizer.param_groups[0]["lr"],
                   "epoch_seconds": time.perf_counter() - t0, "images_per_s": stats["images_per_s"],
                   "data_seconds": stats["data_seconds"], "train_seconds": stats["train_seconds"],
                   "checkpoint": None}
        if out_dir:
            metrics["checkpoint"] = str(out_dir / "last.pt")
        run.history.append(dict(metrics))
        if out_dir:
            _save(run.state_dict(), out_dir / "last.pt")
        if on_epoch is not None:
            on_epoch(dict(metrics))
        if not math.isfinite(metrics["train_loss"]):  # diverged: more epochs only burn the budget
            break
    final = dict(metrics, diverged=not math.isfinite(metrics.get("train_loss", 0.0)), best_val_acc=run.best_val_acc, wall_seconds=time.perf_counter() - t_start,
                 num_params=sum(p.numel() for p in run.model.parameters()),
                 train_images=len(run.train_data), val_images=len(run.val_data), augment=run.augment,
                 device=str(run.device), amp=run.amp)
    if cfg.eval_data:
        final.update(_evaluate_held_out(run, cfg.eval_data, progress))
    if out_dir:
        _write_json(out_dir / "metrics.json", {"config": cfg.to_dict(), "final": final, "history": run.history})
    final["history"] = list(run.history)
    return final


def _evaluate_held_out(run: _Run, spec: str, progress: bool) -> Dict[str, Any]:
    held = data_mod.load(spec, progress=progress)
    train = run.train_data
    if held.in_chans != train.in_chans or held.image_size != train.image_size:
        raise ValueError(f"eval data '{spec}' has images {held.in_chans}x{held.image_size[0]}x{held.image_size[1]} "
                         f"but the training data {train.in_chans}x{train.image_size[0]}x{train.image_size[1]}")
    if held.classes != train.classes:
        raise ValueError(f"eval data '{spec}' has classes {held.classes[:5]}... but the training data "
                         f"{train.classes[:5]}...; both need the same class folders")
    loss, acc = evaluate(run.model, run._loader(held, 256, shuffle=False, augment=False), run.amp)
    return {"eval_loss": loss, "eval_acc": acc, "eval_images": len(held)}


# ----------------------------------------------------------------------------- CLI
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
        values.update(_load_checkpoint(args.resume).get("config", {}))
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
