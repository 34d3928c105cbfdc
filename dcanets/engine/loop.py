"""The one training engine: ``dcanets train``, every Ray Tune trial and every reproduction call it.

A model by timm name, an optimizer by timm registry name (the DCA decompositions are registered
there, so ``opt="dcacounter"`` works exactly like ``opt="sgd"``), a timm lr schedule by name, the
loaders of ``dcanets.engine.data.build_loaders`` (cached or streamed), checkpoints that resume exactly, and JSON
metrics. CUDA is used when present, with mixed precision; on CPU a fixed seed gives identical
runs.
"""
from __future__ import annotations

import functools
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from dcanets.engine import data as data_mod
from dcanets.engine import distributed
from dcanets.engine.checkpoint import rng_state, save, write_json
from dcanets.engine.config import TrainConfig
from dcanets.engine.fidelity import FidelityProbe
from dcanets.engine.recipe import Recipe, evaluate_metrics, group_position, training_loss, updates_per_epoch
from dcanets.engine.resume import load as resumed_checkpoint
from dcanets.engine.rundir import holds_output, prepare_output
from dcanets.names import check_model, did_you_mean
from dcanets.optim.protocol import hooks_model, measured_curvature, prepare, remember_batch, take_step

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler

EVAL_BATCH = 1024  # evaluation keeps no activations for backward: large batches, fewer launches
EpochCallback = Callable[[Dict[str, Any]], None]
BatchCallback = Callable[[int, int, int], None]  # (epoch 1-based, batch 1-based, batches per epoch)


# ----------------------------------------------------------------------------- pieces
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    return dev


def amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the GPU has it (no loss scaling needed), else float16."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    import timm

    check_model(cfg.model)  # also registers the plugins' models in this process (e.g. a Ray worker)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **cfg.model_kwargs}
    try:
        return timm.create_model(cfg.model, **kwargs)
    except TypeError as exc:  # an unknown kwarg surfaces deep inside the model's constructor
        raise ValueError(f"model '{cfg.model}' rejected model_kwargs {cfg.model_kwargs}: {exc}; "
                         "check the names against the model's constructor") from None


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, built by :func:`create_optimizer`."""
    return create_optimizer(model, cfg.opt, cfg.lr, cfg.momentum, cfg.weight_decay, dict(cfg.opt_kwargs))


def create_optimizer(model: torch.nn.Module, opt: str, lr: float, momentum: float, weight_decay: float,
                     opt_kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
    """``create_optimizer_v2`` by registry name; momentum only for optimizers that take it.

    timm's ``sgd`` is Nesterov SGD, which torch refuses without momentum: with ``momentum=0`` it
    becomes plain SGD instead of an error.
    """
    from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

    import dcanets  # noqa: F401  (registers the decompositions into timm's optimizer registry)

    try:
        info = get_optimizer_info(opt.lower().split("_")[-1])
    except (ValueError, KeyError):
        raise ValueError(f"unknown optimizer '{opt}'{did_you_mean(opt, map(str, list_optimizers()))}; "
                         "`timm.optim.list_optimizers()` lists the known names") from None
    kwargs: Dict[str, Any] = dict(lr=lr, weight_decay=weight_decay)
    if info.has_momentum:
        kwargs["momentum"] = momentum
        if momentum == 0 and info.defaults and info.defaults.get("nesterov"):
            kwargs["nesterov"] = False
    try:
        return create_optimizer_v2(model, opt, **{**kwargs, **opt_kwargs})
    except TypeError as exc:
        raise ValueError(f"optimizer '{opt}' rejected its arguments {sorted({**kwargs, **opt_kwargs})}: "
                         f"{exc}") from None


def second_order(opt: str) -> bool:
    from timm.optim import get_optimizer_info

    return bool(get_optimizer_info(opt.lower().split("_")[-1]).second_order)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
    """timm's scheduler for ``cfg.sched`` (``create_scheduler_v2``), fitted into ``cfg.epochs``.

    The engine calls it as timm's train.py does: ``step_update(num_updates)`` after every optimizer
    step and ``step(epoch, metric)`` after every epoch. timm's train.py trains for the epochs the
    factory returns (the cycles, plus the warm-up with warmup_prefix, plus the cooldown); here
    ``epochs`` is the whole budget (a search's budget per trial), so the schedule is fitted into it
    instead: the decay spans the epochs after the warm-up (warmup_prefix) and before the cooldown,
    and the cycles share them. Warm-up is what lets deep nets start at lr 0.1 (He et al. 2015
    warmed ResNet-110 up at 0.01).
    """
    import warnings

    from timm.scheduler import create_scheduler_v2

    per_epoch = cfg.sched == "plateau" or not cfg.sched_on_updates  # timm's plateau only steps per epoch
    with warnings.catch_warnings():
        # timm deprecates plateau because timm's own checkpoints lose its counters; ours keep them
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(optimizer, **_factory_kwargs(cfg), step_on_epochs=per_epoch,
                                           updates_per_epoch=updates_per_epoch)
    return scheduler


def _factory_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """``create_scheduler_v2`` arguments for ``cfg``, in epochs (timm scales them to updates).

    ``none``/``constant`` become what timm's ``constant`` is, a step schedule that never decays
    (timm's ``none`` would skip the warm-up, and timm 1.0.28 has no ``constant``); ``step``
    without ``decay_epochs`` decays at the milestones, like ``multistep``.
    """
    after_warmup = cfg.epochs - (cfg.warmup_epochs if cfg.warmup_prefix else 0.0)
    kwargs: Dict[str, Any] = dict(
        sched=cfg.sched, num_epochs=_first_cycle(after_warmup - cfg.cooldown_epochs, cfg),
        decay_milestones=list(cfg.decay_milestones or (0.5 * after_warmup, 0.75 * after_warmup)),
        decay_rate=cfg.decay_rate, patience_epochs=cfg.patience_epochs, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
        cycle_mul=cfg.lr_cycle_mul, cycle_decay=cfg.lr_cycle_decay, cycle_limit=cfg.lr_cycle_limit,
        plateau_mode="min" if cfg.eval_metric == "val_loss" else "max")
    if cfg.sched in ("none", "constant"):
        kwargs.update(sched="step", decay_epochs=1, decay_rate=1.0)
    elif cfg.sched == "step" and cfg.decay_epochs is None:
        kwargs["sched"] = "multistep"
    elif cfg.decay_epochs is not None:
        kwargs["decay_epochs"] = cfg.decay_epochs
    return kwargs


def _first_cycle(epochs: float, cfg: TrainConfig) -> float:
    """Length of the first of ``lr_cycle_limit`` cycles that fill ``epochs``, each ``lr_cycle_mul``
    times the last (timm's cycle lengths form that geometric series)."""
    cycles, mul = cfg.lr_cycle_limit, cfg.lr_cycle_mul
    return epochs / cycles if mul == 1 else epochs * (mul - 1) / (mul ** cycles - 1)


PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def schedule_state(scheduler: Scheduler, num_updates: int) -> Dict[str, Any]:
    """The schedule's position, for a checkpoint.

    timm's fixed schedules are functions of the update count (and of the config, which the
    checkpoint holds), so the count is their whole state. ``plateau`` also has torch's
    ReduceLROnPlateau counters, inside timm's wrapper, whose own state_dict keeps only ``best``:
    a resume would restart the patience count.
    """
    from timm.scheduler import PlateauLRScheduler

    state: Dict[str, Any] = {"num_updates": num_updates}
    if isinstance(scheduler, PlateauLRScheduler):
        state["plateau"] = {key: getattr(scheduler.lr_scheduler, key) for key in PLATEAU_COUNTERS}
    return state


def restore_schedule(scheduler: Scheduler, state: Dict[str, Any], epoch: int, updates_per_epoch: int) -> int:
    """Put the schedule where ``state`` left it; returns the update count.

    The lr is recomputed from the position (``step_update`` for per-update schedules, ``step`` for
    per-epoch ones; timm ignores the other call), so a resume with more epochs follows the new
    schedule. A checkpoint written before the engine used timm holds a LambdaLR state, whose
    ``last_epoch`` is the same update count.
    """
    from timm.scheduler import PlateauLRScheduler

    num_updates = int(state.get("num_updates", state.get("last_epoch", epoch * updates_per_epoch)))
    if isinstance(scheduler, PlateauLRScheduler) and "plateau" in state:
        for key, value in state["plateau"].items():
            setattr(scheduler.lr_scheduler, key, value)
    scheduler.step_update(num_updates)
    if epoch > 0:  # as timm's train.py on resume; without a metric plateau only re-applies its warm-up lr
        scheduler.step(epoch)
    return num_updates


# ----------------------------------------------------------------------------- the run
class _Run:
    """One training run's state: built from a config, stepped epoch by epoch, checkpointable."""

    def __init__(self, cfg: TrainConfig, progress: bool, on_batch: Optional[BatchCallback] = None) -> None:
        cfg.validate()
        self.cfg, self.on_batch = cfg, on_batch
        self.world, self.device = distributed.join(resolve_device(cfg.device))  # one process, or a DDP rank
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        self.channels_last = bool(cfg.channels_last)
        seed_everything(cfg.seed)
        self.data = data_mod.build_loaders(cfg, self.device, progress, EVAL_BATCH, self.world.rank, self.world.size)
        self.train_data, self.val_data = self.data.train_data, self.data.val_data
        self.mean, self.std = self.data.mean, self.data.std
        self.train_loader, self.val_loader, augment = self.data.train, self.data.val, self.data.augment
        seed_everything(cfg.seed)
        self.model = build_model(cfg, len(self.data.classes), self.data.in_chans).to(self.device)
        if self.channels_last:  # NHWC: the layout cuDNN and oneDNN convolutions run fastest on
            self.model.to(memory_format=torch.channels_last)
        self.model = distributed.sync_batchnorm(self.model, cfg.sync_bn, self.world, self.device)
        self.recipe = Recipe(cfg, self.model, len(self.data.classes))  # Mixup, EMA, clipping, accumulation
        self.optimizer = build_optimizer(cfg, self.model)
        self.needs_closure = prepare(self.optimizer, self.model)
        distributed.parallel_steps(self.world, self.optimizer, len(self.train_data), fidelity_every=cfg.fidelity_every,
                                   sync_bn=cfg.sync_bn)
        self.recipe.check(self.optimizer, self.needs_closure, self._rank_images(), len(self.train_loader))
        self.create_graph = second_order(cfg.opt)
        self.updates_per_epoch = updates_per_epoch(len(self.train_loader), self.recipe.accum)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.updates_per_epoch)
        self.num_updates = 0  # optimizer steps so far: the position of a per-update schedule
        # GradScaler cannot drive closure-stepped optimizers: those run in full precision
        if self.needs_closure:
            self.amp = False
        self.amp_dtype = amp_dtype(cfg.amp_dtype, self.device)
        # bf16 has fp32's exponent range: only fp16 needs loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.parallel = distributed.parallel_model(self.model, self.world, self.device)  # DDP for several ranks
        if self.world.parallel:  # each rank its own dropout and Mixup draws (timm: seed + rank); data order: global
            seed_everything(cfg.seed + self.world.rank)
        self.forward = self._compiled() if cfg.compile else self.parallel
        # the training loss, also the one a curvature-measuring decomposition differentiates
        self.loss_fn = training_loss(cfg)
        self.epoch, self.best_val_acc, self.history = 0, 0.0, []  # type: ignore[var-annotated]
        self.augment = augment
        self.fidelity = self._fidelity_probe()
        self.fidelity_reports: List[Any] = []  # this epoch's measurements

    def _fidelity_probe(self) -> Any:
        """The direction-fidelity probe of ``fidelity_every`` (None when off); a model or reference it
        cannot measure fails here, before any training step."""
        if not self.cfg.fidelity_every:
            return None
        try:  # seed=None: the passes use the training run's RNG, forked in _measured_step
            return FidelityProbe(self.model, self.cfg.fidelity_reference, baseline=True, seed=None,
                                 create_graph=self.create_graph)
        except ValueError as exc:
            raise ValueError(f"fidelity_every={self.cfg.fidelity_every}: {exc}") from None

    def settle_batchnorm(self) -> None:
        """Every rank's BatchNorm statistics, the model's and the EMA's, made the same (an epoch's end)."""
        ema = [self.recipe.ema.module] if self.recipe.ema is not None else []
        distributed.settle_batchnorm(self.world, bool(self.cfg.sync_bn), self.model, *ema)

    def _rank_images(self) -> int:
        """The training images this rank sees per epoch (all of them for one process)."""
        return distributed.rank_share(len(self.train_data), int(self.cfg.batch_size), self.world.rank, self.world.size,
                                      even=True)

    def _compiled(self) -> Callable[..., torch.Tensor]:
        """``torch.compile`` of the training forward; the counter-loss decompositions hook the eager modules."""
        if self.needs_closure or hooks_model(self.optimizer):
            raise ValueError(f"compile=True cannot be combined with opt='{self.cfg.opt}': its hooks run on the eager "
                             "modules, which a compiled forward bypasses; use compile=False")
        return torch.compile(self.parallel)

    def train_epoch(self) -> Dict[str, Any]:
        model = self.model
        model.train()
        self.train_loader.set_epoch(self.epoch)
        self.train_loader.data_seconds = 0.0
        # running sums live on the device: reading them every step would stall the GPU each time
        loss_sum = correct = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        t0 = time.perf_counter()
        batches = len(self.train_loader)
        every = int(self.cfg.fidelity_every)
        self.fidelity_reports = []
        for k, (x, y) in enumerate(self.train_loader, 1):
            position, count = group_position(k - 1, batches, self.recipe.accum)  # grad_accum_steps
            inputs, targets = self.recipe.batch(x, y, self.epoch)  # Mixup/CutMix: mixed images, soft targets
            if self.fidelity is not None and self.num_updates % every == 0:
                loss, out = self._measured_step(inputs, targets, self.num_updates)
            else:
                loss, out = self._step(inputs, targets, position, count)
            loss_sum = loss_sum + loss.double() * len(y)
            correct = correct + (out.argmax(1) == y).sum()
            n += len(y)
            if self.recipe.stepped(position, count):
                self.num_updates += 1  # the global count, restored on resume: timm's lr is a function of it
                self.recipe.after_update(self.model, self.num_updates)  # model_ema
                self.scheduler.step_update(num_updates=self.num_updates)
            if self.on_batch is not None:  # counts only: reading the loss here would stall the GPU
                self.on_batch(self.epoch + 1, k, batches)
        (loss_sum, correct), n = distributed.totals([loss_sum, correct], n, self.world.size)  # every rank's images
        loss_mean, acc = float(loss_sum) / max(n, 1), float(correct) / max(n, 1)  # one wait per epoch
        seconds = time.perf_counter() - t0
        self.epoch += 1
        return {"train_loss": loss_mean, "train_acc": acc, "train_seconds": seconds,
                "images_per_s": n / max(seconds, 1e-9), "data_seconds": self.train_loader.data_seconds}

    def end_epoch(self, val_loss: float, val_acc: float) -> None:
        """timm's end-of-epoch call (train.py: ``lr_scheduler.step(epoch + 1, eval_metric)``): the next
        epoch's lr of a per-epoch schedule, and plateau's metric (none without validation images)."""
        metric = val_loss if self.cfg.eval_metric == "val_loss" else val_acc
        self.scheduler.step(self.epoch, metric if math.isfinite(metric) else None)

    def _measured_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_step`` with the direction fidelity of its weight change (:mod:`dcanets.engine.fidelity`).

        The reference and baseline passes run before the step in fp32 (outside autocast), in train
        mode, with BatchNorm's running statistics frozen and the RNG forked: they draw the random
        numbers the step will draw (the same dropout) and leave the RNG state to it, so the training
        trajectory is the one without the diagnostic. Δw is the real step (under AMP, if on)."""
        assert self.fidelity is not None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            pending = self.fidelity.begin(x, y)
        loss, out = self._step(x, y)
        self.fidelity_reports.append(self.fidelity.finish(pending, self.optimizer, step))
        return loss, out

    def fidelity_metrics(self) -> Dict[str, Any]:
        """This epoch's fidelity: means over its measurements (``fidelity_cos``, ``fidelity_sgd_cos``,
        ``fidelity_cos_<stage>``; NaN cosines, from a zero step, left out) and the raw list."""
        if self.fidelity is None:
            return {}

        def mean(values: List[Optional[float]]) -> float:
            finite = [v for v in values if v is not None and math.isfinite(v)]
            return sum(finite) / len(finite) if finite else float("nan")

        reports = self.fidelity_reports
        out: Dict[str, Any] = {"fidelity_cos": mean([r.cosine for r in reports]),
                               "fidelity_sgd_cos": mean([r.baseline_cosine for r in reports])}
        for stage in (reports[0].stages if reports else {}):
            out[f"fidelity_cos_{stage}"] = mean([r.stages[stage].cosine for r in reports])
        out["fidelity"] = [{"step": r.step, "cos": d["cosine"], "sgd_cos": d["baseline_cosine"],
                            "step_norm": d["step_norm"], "sgd_grad_norm": d["baseline_norm"],
                            "stages": {k: v["cosine"] for k, v in d["stages"].items()}}
                           for r, d in ((r, r.to_dict()) for r in reports)]
        return out

    def _step(self, x: torch.Tensor, y: torch.Tensor, position: int = 0,
              count: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch ``position`` of an accumulation group of ``count``: the gradients of the group's
        batches are summed and the optimizer steps after the last one."""
        opt = self.optimizer
        remember_batch(opt, x, y, self.loss_fn)  # rho="auto" / a measured kappa: curvature on this batch
        outputs: List[torch.Tensor] = []

        def closure() -> torch.Tensor:
            # closure-stepped optimizers run without AMP (amp and the scaler are off, compile refused)
            if position == 0:
                opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                out = self.forward(x)
                loss = self.loss_fn(out.float(), y)
            self.scaler.scale(self.recipe.micro_loss(loss, count)).backward(create_graph=self.create_graph)
            outputs.append(out.detach())
            return loss.detach()

        if position + 1 < count:  # not the group's last batch: gradients only (DDP: summed here, averaged at the last)
            with torch.enable_grad(), distributed.no_sync(self.parallel):
                return closure(), outputs[0]
        loss = take_step(opt, closure, self.needs_closure, self.scaler,
                         before_step=self.recipe.clipping(opt, self.scaler))  # clip_grad
        return loss, outputs[0]

    def state_dict(self) -> Dict[str, Any]:
        return {"config": self.cfg.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": schedule_state(self.scheduler, self.num_updates),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "best_val_acc": self.best_val_acc,
                "world_size": self.world.size, **distributed.rng_states(self.world, rng_state()),  # a collective
                "history": self.history, "classes": self.data.classes,
                "mean": self.mean, "std": self.std, **self.recipe.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best_val_acc = int(ckpt["epoch"]), float(ckpt["best_val_acc"])
        self.num_updates = restore_schedule(self.scheduler, ckpt["scheduler"], self.epoch, self.updates_per_epoch)
        self.history = list(ckpt["history"])
        self.recipe.load_state_dict(ckpt)
        distributed.restore_rng(ckpt, self.world, self.cfg.seed)


def train(cfg: TrainConfig, on_epoch: Optional[EpochCallback] = None,
          resume: str | Path | None = None, progress: bool = True,
          on_batch: Optional[BatchCallback] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the final metrics.

    ``on_epoch`` receives after every epoch: epoch (1-based), train_loss, train_acc, val_loss,
    val_acc, lr, epoch_seconds, images_per_s, data_seconds, checkpoint, world_size (the data-parallel processes,
    ``dcanets.engine.distributed``; every rank gets the global numbers), val_acc5 (at least five classes),
    with ``model_ema`` val_loss_ema, val_acc_ema, val_acc5_ema (``dcanets.engine.recipe``), with ``fidelity_every``
    the epoch's mean direction fidelity: fidelity_cos, fidelity_sgd_cos, fidelity_cos_<stage> (the
    raw measurements go to the history entry's ``fidelity`` list, see docs/fidelity.md). ``resume`` (a last.pt or
    its directory) restores model, optimizer, scheduler, epoch and RNG so the run continues
    exactly as an uninterrupted one would. ``progress`` shows a bar while a data set is decoded
    (once; later runs read the cache). ``on_batch(epoch, batch, batches)`` is called after every
    training step (progress bars).
    """
    cfg.validate()
    distributed.join(resolve_device(cfg.device))  # the ranks' process group first: rank 0 claims the folder for all
    return _claimed(cfg, on_epoch, resume, progress, on_batch, time.perf_counter())


@holds_output  # the output folder is locked while the run runs; a fresh run never replaces an earlier one
def _claimed(cfg: TrainConfig, on_epoch: Optional[EpochCallback], resume: str | Path | None, progress: bool,
             on_batch: Optional[BatchCallback], t_start: float) -> Dict[str, Any]:
    """:func:`train` in its run folder, which rank 0 holds for every rank (``dcanets.engine.rundir``)."""
    if cfg.eval_data and cfg.eval_data not in ("digits",) and not cfg.eval_data.startswith("synthetic"):
        data_mod.check_path(cfg.eval_data)  # a missing held-out set fails now, not after the last epoch
    world = distributed.current()
    out_dir = (prepare_output(cfg.output) if world.main else Path(cfg.output)) if cfg.output else None
    # refuses changes a resume must keep; the world size may change with the global batch kept
    ckpt = resumed_checkpoint(resume, cfg, world.size) if resume is not None else None
    run = _Run(cfg, progress, on_batch)
    try:
        return _epochs(run, cfg, on_epoch, ckpt, out_dir, progress, t_start)
    finally:
        run.data.close()  # stream mode's worker processes end with the run, not at garbage collection


def _epochs(run: _Run, cfg: TrainConfig, on_epoch: Optional[EpochCallback], ckpt: Optional[Dict[str, Any]],
            out_dir: Optional[Path], progress: bool, t_start: float) -> Dict[str, Any]:
    """:func:`train` after the run is built: resume, the epochs, the final metrics and files."""
    if ckpt is not None:
        run.load_state_dict(ckpt)
    metrics: Dict[str, Any] = run.history[-1] if run.history else {}
    while run.epoch < cfg.epochs:
        t0 = time.perf_counter()
        stats = run.train_epoch()
        run.settle_batchnorm()  # data parallel: one model on every rank, to validate and save
        val = run.recipe.validate(run.model, run.val_loader, run.amp, run.amp_dtype, len(run.val_data))
        val_loss, val_acc = val["val_loss"], val["val_acc"]
        followed_loss, followed_acc = run.recipe.followed(val)  # model_ema: the EMA's, as timm's train.py
        run.best_val_acc = max(run.best_val_acc, followed_acc) if followed_acc == followed_acc else run.best_val_acc
        run.end_epoch(followed_loss, followed_acc)
        metrics = {"epoch": run.epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                   "val_loss": val_loss, "val_acc": val_acc, "lr": run.optimizer.param_groups[0]["lr"],
                   "epoch_seconds": time.perf_counter() - t0, "images_per_s": stats["images_per_s"],
                   "data_seconds": stats["data_seconds"], "train_seconds": stats["train_seconds"],
                   "checkpoint": None, "world_size": run.world.size}
        metrics.update(val)  # val_acc5 (>= 5 classes); val_loss_ema, val_acc_ema (model_ema)
        if out_dir:
            metrics["checkpoint"] = str(out_dir / "last.pt")
        fidelity = run.fidelity_metrics()
        raw = fidelity.pop("fidelity", None)
        metrics.update(fidelity)
        metrics.update(measured_curvature(run.optimizer))  # rho="auto" / a measured kappa: the last values
        run.history.append(dict(metrics) if raw is None else dict(metrics, fidelity=raw))
        if out_dir:
            state = run.state_dict()  # on every rank: it gathers the ranks' RNG states
            distributed.on_main(functools.partial(save, state, out_dir / "last.pt"), run.world)  # full disk: all end
        if on_epoch is not None:
            on_epoch(dict(metrics))
        if not math.isfinite(metrics["train_loss"]):  # diverged: more epochs only burn the budget
            break
    final = dict(metrics, diverged=not math.isfinite(metrics.get("train_loss", 0.0)), best_val_acc=run.best_val_acc,
                 wall_seconds=time.perf_counter() - t_start,
                 num_params=sum(p.numel() for p in run.model.parameters()),
                 train_images=len(run.train_data), val_images=len(run.val_data), augment=run.augment,
                 data_mode=run.data.mode, world_size=run.world.size,
                 device=str(run.device), amp=run.amp,
                 amp_dtype=str(run.amp_dtype).removeprefix("torch.") if run.amp else None,
                 channels_last=run.channels_last, compile=bool(cfg.compile))
    if cfg.eval_data:
        final.update(_evaluate_held_out(run, cfg.eval_data, progress))
    if out_dir:
        record = {"config": cfg.to_dict(), "final": final, "history": run.history}
        distributed.on_main(functools.partial(write_json, out_dir / "metrics.json", record), run.world)
    final["history"] = list(run.history)
    return final


def _evaluate_held_out(run: _Run, spec: str, progress: bool) -> Dict[str, Any]:
    loader, images = data_mod.held_out(spec, run.data, progress)
    metrics = evaluate_metrics(run.model, loader, run.amp, run.amp_dtype)
    return {**{f"eval_{name}": value for name, value in metrics.items()}, "eval_images": images}
