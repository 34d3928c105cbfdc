"""timm's ImageNet training recipe in the engine: Mixup/CutMix with soft targets, model EMA, top-5
accuracy, gradient clipping and gradient accumulation.

Each piece is timm's own (``timm.data.Mixup``, ``timm.loss.SoftTargetCrossEntropy``,
``timm.utils.ModelEmaV3``, ``timm.utils.dispatch_clip_grad``), configured by the ``TrainConfig``
fields that timm's ``train.py`` names the same way, and used where timm's ``train_one_epoch`` uses
it. The loop (``dcanets.engine.loop``) calls :class:`Recipe` at four points of a step: the batch
(mixing), the backward (a group's loss is divided by its size), just before ``optimizer.step``
(clipping) and after it (the EMA update).

With the DC decompositions (``dcanets.optim``):

- the loss a curvature-measuring decomposition differentiates (``remember_batch``) is the training
  loss: with mixing, the soft-target cross-entropy on the mixed batch (on the last micro-batch of
  an accumulation group, the batch the step sees last);
- clipping acts on ``p.grad`` before the step, as in timm. A decomposition that takes eq. 17's c
  from the hooks of the backward (``ShortcutTap``) rescales c by the factor by which the step's
  gradients changed since the backward, so norm clipping (one factor for every gradient) turns
  d = s_a·a + s_c·c into the same decomposition's direction for the clipped gradient. Value and
  AGC clipping change a element- or row-wise, which has no counterpart for c: refused there;
- a decomposition stepped with a closure (``prepare`` returns True) evaluates the loss and its
  gradients inside ``optimizer.step(closure)``, where no clipping or accumulation can act: both are
  refused for it rather than silently not applied.

Under data parallelism (``dcanets.engine.distributed``), as in timm's train.py:

- clipping (and the GradScaler's unscale before it) acts after the decomposition's
  ``gradients_ready()`` (``take_step``'s order): on the averaged ``p.grad`` and the averaged c, the
  same on every rank;
- the micro-batches of an accumulation group before its last run under DDP's ``no_sync()``: the
  gradients (and eq. 17's c) add up on each rank and are averaged once, by the last backward;
- the EMA is updated on every rank from the same weights, and its BatchNorm statistics are averaged
  over the ranks with the model's at each epoch's end, so every rank holds the same EMA;
- Mixup/CutMix draw λ and the pairs on each rank from its own generator (seeded ``seed + rank``,
  as timm's ranks are) and mix within the rank's slice: a run of N ranks mixes differently from
  one process on the global batch (the global gradient is still the mean over the ranks).
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dcanets.engine.config import TrainConfig
from dcanets.engine.distributed import totals
from dcanets.optim.protocol import hooks_model
from dcanets.optim.rho import LossFn

if TYPE_CHECKING:
    from dcanets.engine.data import BatchLoader

TOP5 = 5  # top-5 accuracy is reported where the data has at least this many classes


def training_loss(cfg: TrainConfig) -> LossFn:
    """The loss of a training step: with Mixup/CutMix timm's soft-target cross-entropy (label
    smoothing is then part of Mixup's targets, as in timm's train.py), else cross-entropy with
    ``label_smoothing``."""
    if cfg.mixup_active:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return functools.partial(F.cross_entropy, label_smoothing=float(cfg.label_smoothing))


def updates_per_epoch(batches: int, accum: int) -> int:
    """Optimizer updates in an epoch of ``batches`` batches (timm: the last group may be shorter)."""
    return -(-batches // accum)


def group_position(batch: int, batches: int, accum: int) -> Tuple[int, int]:
    """(position of batch ``batch`` (0-based) in its accumulation group, the group's size): groups
    of ``accum`` batches, the epoch's last one shorter when ``accum`` does not divide ``batches``
    (timm's ``last_accum_steps``); an update never straddles an epoch."""
    start = batch - batch % accum
    return batch - start, min(accum, batches - start)


@torch.inference_mode()
def evaluate_metrics(model: torch.nn.Module, loader: BatchLoader, amp: bool,
                     dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Mean cross-entropy (``loss``), top-1 accuracy (``acc``) and, with at least five classes,
    top-5 accuracy (``acc5``: the label is among the five largest outputs) over ``loader``.

    Sums stay on the device until the end: a ``float()`` per batch would wait for the GPU each time.
    A loader of one data-parallel rank's part (``world_size`` > 1) is summed over every rank.
    """
    model.eval()
    loss_sum = correct = correct5 = torch.zeros((), dtype=torch.float64, device=loader.device)
    n = classes = 0
    for x, y in loader:
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=amp):
            out = model(x)
        loss_sum = loss_sum + F.cross_entropy(out.float(), y, reduction="sum")
        correct = correct + (out.argmax(1) == y).sum()
        classes = out.shape[1]
        if classes >= TOP5:
            correct5 = correct5 + (out.topk(TOP5, dim=1).indices == y[:, None]).any(1).sum()
        n += len(y)
    (loss_sum, correct, correct5), n = totals([loss_sum, correct, correct5], n, getattr(loader, "world_size", 1))
    metrics = {"loss": float(loss_sum) / max(n, 1), "acc": float(correct) / max(n, 1)}
    if classes >= TOP5:
        metrics["acc5"] = float(correct5) / max(n, 1)
    return metrics


class Recipe:
    """The recipe pieces ``cfg`` turns on, for one run's model (built before the optimizer hooks the
    model, so the EMA copy carries none of them)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, num_classes: int) -> None:
        self.cfg, self.model = cfg, model
        self.accum = int(cfg.grad_accum_steps)
        self.pending = 0  # batches backpropagated since the last optimizer update
        self.mixup: Any = None
        if cfg.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        self.ema: Any = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        self.clip_params: List[torch.nn.Parameter] = []
        if cfg.clip_grad is not None:
            from timm.models import model_parameters

            # timm's train.py: AGC leaves the classifier (the last two parameters) unclipped
            self.clip_params = list(model_parameters(model, exclude_head=cfg.clip_mode == "agc"))
        self._box_checked = False

    # -- before the first step ---------------------------------------------------------------
    def check(self, optimizer: torch.optim.Optimizer, needs_closure: bool, images: int, batches: int) -> None:
        """Refuse, in one line each, the combinations that would train silently differently from
        what the config says (see the module docstring)."""
        cfg, opt = self.cfg, self.cfg.opt
        if needs_closure and cfg.clip_grad is not None:
            raise ValueError(f"clip_grad cannot be combined with opt='{opt}' as configured: its step evaluates the "
                             "loss and its gradients inside optimizer.step(closure), where no clipping applies; "
                             "unset clip_grad")
        if needs_closure and self.accum > 1:
            raise ValueError(f"grad_accum_steps={self.accum} cannot be combined with opt='{opt}' as configured: its "
                             "step re-evaluates the loss on one batch inside optimizer.step(closure); use "
                             "grad_accum_steps=1 (and a larger batch_size)")
        if cfg.clip_grad is not None and cfg.clip_mode != "norm" and hooks_model(optimizer):
            raise ValueError(f"clip_mode='{cfg.clip_mode}' cannot be combined with opt='{opt}': its direction adds "
                             "eq. 17's c from the backward's hooks, which only norm clipping (one factor for every "
                             "gradient) scales consistently; use clip_mode='norm'")
        if cfg.fidelity_every and self.accum > 1:
            raise ValueError(f"fidelity_every cannot be combined with grad_accum_steps={self.accum}: the diagnostic "
                             "compares one batch's reference gradient with the step; use grad_accum_steps=1")
        last = min(int(cfg.batch_size), images - (batches - 1) * int(cfg.batch_size))
        if self.mixup is not None and last % 2:
            raise ValueError(f"mixup/cutmix mix pairs of images, but the last batch of each epoch has {last} (odd): "
                             f"{images} training images in batches of {cfg.batch_size}; use at least "
                             f"{2 * int(cfg.batch_size)} training images or a batch_size that leaves an even remainder")

    # -- a step --------------------------------------------------------------------------------
    def batch(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch a step trains on: with Mixup/CutMix the mixed images (in place) and soft
        targets (rows summing to 1, label smoothing included); mixing stops from epoch
        ``mixup_off_epoch`` (0-based, as timm), the targets staying soft."""
        if self.mixup is None:
            return x, y
        off = self.cfg.mixup_off_epoch
        self.mixup.mixup_enabled = not (off and epoch >= off)
        if not self._box_checked:
            self._check_box(x.shape[-2:])
        return self.mixup(x, y)

    def _check_box(self, size: torch.Size) -> None:
        minmax = self.cfg.cutmix_minmax
        if minmax is not None and any(int(side * minmax[0]) >= int(side * minmax[1]) for side in size):
            raise ValueError(f"cutmix_minmax={list(minmax)} leaves no box side to draw on {size[0]}x{size[1]} "
                             "images (timm draws in [int(side*min), int(side*max))); widen the range")
        self._box_checked = True

    def micro_loss(self, loss: torch.Tensor, count: int) -> torch.Tensor:
        """What a batch backpropagates: its loss over the group's size, so the group's summed gradient
        is that of its mean loss (timm's ``loss /= accum_steps``)."""
        return loss if count == 1 else loss / count

    def clipping(self, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler) -> Optional[Callable[[], None]]:
        """What runs between the backward and ``optimizer.step`` (``take_step``'s ``before_step``):
        with ``clip_grad``, clip ``p.grad`` as timm's train.py does (``dispatch_clip_grad``), after
        the GradScaler has unscaled it, so the bound is on the gradient the optimizer steps with."""
        if self.cfg.clip_grad is None:
            return None
        from timm.utils import dispatch_clip_grad

        value, mode = float(self.cfg.clip_grad), self.cfg.clip_mode

        def clip() -> None:
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            dispatch_clip_grad(self.clip_params, value=value, mode=mode)

        return clip

    def stepped(self, position: int, count: int) -> bool:
        """Count the batch just backpropagated; True when it ended its group (the optimizer stepped)."""
        self.pending = 0 if position + 1 == count else position + 1
        return self.pending == 0

    def after_update(self, model: torch.nn.Module, num_updates: int) -> None:
        """The EMA update after optimizer update ``num_updates`` (1-based; timm's decay is 0 at the
        first, so the EMA starts at the first updated weights)."""
        if self.ema is not None:
            self.ema.update(model, step=num_updates)

    # -- after an epoch ------------------------------------------------------------------------
    def validate(self, model: torch.nn.Module, loader: BatchLoader, amp: bool, dtype: Optional[torch.dtype],
                 images: int) -> Dict[str, float]:
        """``val_loss``, ``val_acc`` (``val_acc5``) of the model and, with ``model_ema``, ``val_loss_ema``,
        ``val_acc_ema`` (``val_acc5_ema``) of the EMA weights; NaN without validation images."""
        models = {"": model, **({"_ema": self.ema.module} if self.ema is not None else {})}
        out: Dict[str, float] = {}
        for suffix, net in models.items():
            metrics = evaluate_metrics(net, loader, amp, dtype) if images else {"loss": math.nan, "acc": math.nan}
            out.update({f"val_{name}{suffix}": value for name, value in metrics.items()})
        return out

    def followed(self, val: Dict[str, float]) -> Tuple[float, float]:
        """(loss, accuracy) that ``best_val_acc`` and the plateau schedule follow: the EMA's with
        ``model_ema``, as timm's train.py (its eval metrics become the EMA's), else the model's."""
        suffix = "_ema" if self.ema is not None else ""
        return val[f"val_loss{suffix}"], val[f"val_acc{suffix}"]

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The EMA weights (``model_ema``) and the accumulation position, for ``last.pt``."""
        state: Dict[str, Any] = {"grad_accum": {"steps": self.accum, "pending": self.pending}}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """Restore after the model's weights. A checkpoint without these keys (written before, or
        with ``model_ema`` off) starts the EMA from the resumed weights, as timm's resume does."""
        accum = ckpt.get("grad_accum", {"steps": 1, "pending": 0})
        if int(accum["pending"]):
            raise ValueError(f"checkpoint was written {accum['pending']} batches into a gradient-accumulation group, "
                             "whose gradients it does not hold; resume from a checkpoint written at an epoch's end")
        if int(accum["steps"]) != self.accum:
            raise ValueError(f"checkpoint was trained with grad_accum_steps={accum['steps']}, not {self.accum}; "
                             "resume with the same grad_accum_steps (the schedule counts its updates)")
        if self.ema is not None:
            if "model_ema" in ckpt:
                self.ema.module.load_state_dict(ckpt["model_ema"])
            else:
                self.ema.set(self.model)
