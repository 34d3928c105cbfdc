"""The direction-fidelity probe: the cosine of a real step with the shortcut network's gradient.

``dcanets.engine`` runs it every ``fidelity_every`` training steps (``TrainConfig``), and
``dcanets.analysis.fidelity`` (single probes, several optimizers at one point, whole runs) builds
on it. At the current weights w_k and on one batch, :class:`FidelityProbe` computes

* the reference gradient g_ref, the gradient of the *twin* of the model (:func:`shortcut_twin`):
  the ``gradnet`` network of the same weights, every selected block computing
  ``act(F(x)) + (s(x) − s(x).detach())`` (plain forward, shortcut backward). A block that already
  has a shortcut (α ≠ 0, e.g. a ResNet or NegNet) or a gradient-only shortcut (``gradnet``) is left
  as it is, so for those models the reference is the model's own gradient;
* the step Δw = w_{k+1} − w_k of one real ``optimizer.step`` on that batch (:func:`optimizer_step`:
  with a closure when :func:`dcanets.optim.prepare` says the optimizer needs one);
* the fidelity cos(Δw, −g_ref), for the whole net and per stage (:func:`stage_names`: stem, each
  stage, head), with the norms of both (:class:`FidelityReport`). The *baseline* is
  cos(−∇L, −g_ref), the fidelity plain SGD (no momentum, no weight decay) would have there.

Both passes run in train mode (BatchNorm with the batch's statistics, so both see the same
forward), from the same RNG seed; the reference pass leaves BatchNorm running statistics as they
were. The twin is made by switching the blocks' merge arguments to the gradnet family's
(``dcanets.layers.merging_as``) for the duration of one forward/backward and switching them back,
so no second model is built and the state dicts are the same by construction.

Reference choices (:data:`REFERENCES`): ``"gradnet"`` (every block of the family, a
``dcanets.layers.ShortcutBlock``), ``"last"`` (only the last block whose output has the shape of
its input: the block ``dcacounter``'s counter loss skips with ``where="last"``, the one-block
TestNet of the paper's derivation), ``"self"`` (the model's own gradient), or a list of block
module names.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets._compat import unwrap_optimizer
from dcanets.hessian import FrozenBuffers
from dcanets.layers.shortcut import ShortcutBlock, is_plain, merging_as, shortcut_blocks
from dcanets.optim import DCAOptimizer, prepare, remember_batch, take_step
from dcanets.optim.rho import LossFn

Reference = Union[str, Sequence[str]]
REFERENCES = ("gradnet", "last", "self")


# -- the twin -----------------------------------------------------------------------------------

def _select(model: nn.Module, reference: Reference) -> List[ShortcutBlock]:
    blocks = shortcut_blocks(model)
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)} or a list of block names; "
                             f"got {reference!r}")
        if reference == "self":
            return []
        if not blocks:
            raise ValueError(f"model {type(model).__name__} has no blocks of the shortcut family "
                             "(dcanets.layers.ShortcutBlock): use reference='self', or a "
                             "model of plugins/shortcut.py or plugins/cifar_shortcut.py")
        if reference == "gradnet":
            return [m for _, m in blocks]
        same_shape = [m for _, m in blocks if m.downsample is None]
        if not same_shape:
            raise ValueError(f"model {type(model).__name__} has no same-shape block for reference='last'")
        return same_shape[-1:]
    names = dict(blocks)
    unknown = [n for n in reference if n not in names]
    if unknown:
        raise ValueError(f"not blocks of the shortcut family: {unknown}; known: {list(names)[:6]}...")
    return [names[n] for n in reference]


@contextmanager
def shortcut_twin(model: nn.Module, reference: Reference = "gradnet") -> Iterator[List[ShortcutBlock]]:
    """Within the block, ``model`` is its gradnet twin: each selected plain block (α = 0, not
    gradient-only) computes ``act(F(x)) + (s(x) − s(x).detach())``, whose value is the plain
    block's ``act(F(x))`` and whose gradient has the identity/projection shortcut's part. Blocks
    that already have a shortcut are unchanged. Yields the switched blocks; restores them on exit."""
    switched = [m for m in _select(model, reference) if is_plain(m)]
    with merging_as(switched, "gradnet"):
        yield switched


# -- stages -------------------------------------------------------------------------------------

def stage_names(model: nn.Module) -> Dict[str, str]:
    """Parameter name -> stage: each top-level ``nn.Sequential`` is a stage (``layer1`` ...; a
    Sequential of Sequentials such as timm's ``stages`` gives ``stages.0`` ...); parameters
    registered before the first stage are ``stem``, after the last one ``head``."""
    children = dict(model.named_children())
    raw: List[Tuple[str, Optional[str]]] = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        top = children.get(parts[0])
        stage: Optional[str] = None
        if isinstance(top, nn.Sequential) and len(parts) > 1:
            inner = getattr(top, parts[1], None)
            nested = len(top) > 0 and all(isinstance(c, nn.Sequential) for c in top.children())
            stage = f"{parts[0]}.{parts[1]}" if nested and isinstance(inner, nn.Sequential) else parts[0]
        raw.append((name, stage))
    seen_stage = False
    out: Dict[str, str] = {}
    for name, stage in raw:
        if stage is not None:
            seen_stage = True
            out[name] = stage
        else:
            out[name] = "head" if seen_stage else "stem"
    return out


# -- report -------------------------------------------------------------------------------------

@dataclass
class StageFidelity:
    """cos(Δw, −g_ref) over one group of parameters, the norms, and SGD's cosine there
    (``baseline_norm``: ‖∇L‖ there, so ‖Δw‖/(lr·‖∇L‖) says how long the step is next to SGD's)."""

    cosine: float
    step_norm: float
    reference_norm: float
    baseline_cosine: Optional[float]
    numel: int
    baseline_norm: Optional[float] = None


@dataclass
class FidelityReport:
    """One measurement. ``cosine``: cos(Δw, −g_ref) over the whole net; ``baseline_cosine``:
    cos(−∇L, −g_ref) (plain SGD's fidelity at the same point); ``stages`` per stage; ``loss``:
    the model's loss at w_k on the batch; ``forward_gap``: |L_twin − L|, 0 up to rounding for a
    faithful twin (same forward); ``step``: the training step (None for a single probe);
    ``baseline_norm``: ‖∇L‖ (None without a baseline)."""

    cosine: float
    step_norm: float
    reference_norm: float
    baseline_cosine: Optional[float]
    stages: Dict[str, StageFidelity]
    loss: float
    forward_gap: Optional[float]
    reference: str
    step: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    baseline_norm: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: NaN (an undefined cosine, a zero vector) becomes None."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        return clean(asdict(self))


def _cos(dot: float, n1: float, n2: float) -> float:
    return dot / (n1 * n2) if n1 > 0 and n2 > 0 else float("nan")


def _report(names: List[str], stage_of: Dict[str, str], delta: List[torch.Tensor], ref: List[torch.Tensor],
            base: Optional[List[torch.Tensor]], **kw: Any) -> FidelityReport:
    """Cosines of Δw with −g_ref (and of −∇L with −g_ref) overall and per stage, in float64."""
    acc: Dict[str, List[float]] = {}   # stage -> [Δw·(−g), |Δw|², |g|², (−∇L)·(−g), |∇L|², numel]
    for name, dw, g, b in zip(names, delta, ref, base if base is not None else [None] * len(names)):
        dw, g = dw.double().flatten(), g.double().flatten()
        row = acc.setdefault(stage_of.get(name, "other"), [0.0] * 6)
        row[0] += float(dw @ -g)
        row[1] += float(dw @ dw)
        row[2] += float(g @ g)
        if b is not None:
            bb = b.double().flatten()
            row[3] += float(bb @ g)
            row[4] += float(bb @ bb)
        row[5] += dw.numel()
    total = [sum(r[i] for r in acc.values()) for i in range(6)]

    def stage(r: List[float]) -> StageFidelity:
        bc = _cos(r[3], math.sqrt(r[4]), math.sqrt(r[2])) if base is not None else None
        return StageFidelity(_cos(r[0], math.sqrt(r[1]), math.sqrt(r[2])), math.sqrt(r[1]), math.sqrt(r[2]),
                             bc, int(r[5]), math.sqrt(r[4]) if base is not None else None)

    whole = stage(total)
    return FidelityReport(cosine=whole.cosine, step_norm=whole.step_norm, reference_norm=whole.reference_norm,
                          baseline_cosine=whole.baseline_cosine, stages={k: stage(v) for k, v in acc.items()},
                          baseline_norm=whole.baseline_norm, **kw)


# -- the passes ---------------------------------------------------------------------------------

@contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Fork the RNG and seed it (so two passes draw the same dropout/augmentation), or do nothing."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def trainable_params(model: nn.Module) -> Tuple[List[str], List[nn.Parameter]]:
    """(names, parameters) of the parameters that require a gradient, in registration order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _gradient(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
              params: List[nn.Parameter], seed: Optional[int]) -> Tuple[List[torch.Tensor], float]:
    """∇ of loss_fn(model(inputs), targets) at the current weights, leaving p.grad and the
    buffers untouched; zeros for parameters the loss does not reach."""
    with seeded(seed, inputs.device), FrozenBuffers(model), torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)], float(loss.detach())


def reference_gradient(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       reference: Reference = "gradnet", loss_fn: LossFn = F.cross_entropy,
                       seed: Optional[int] = 0) -> Tuple[List[torch.Tensor], float]:
    """(g_ref per parameter with ``requires_grad``, in ``model.named_parameters()`` order; the twin's loss)."""
    _, params = trainable_params(model)
    with shortcut_twin(model, reference):
        return _gradient(model, inputs, targets, loss_fn, params, seed)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                   targets: torch.Tensor, loss_fn: LossFn = F.cross_entropy, create_graph: bool = False) -> float:
    """One ordinary training step: with a closure when ``prepare`` says the optimizer needs one."""
    needs_closure = prepare(optimizer, model)
    remember_batch(optimizer, inputs, targets, loss_fn)   # a decomposition measuring rho / kappa on it

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward(create_graph=create_graph)
        return loss.detach()

    return float(take_step(optimizer, closure, needs_closure))


class FidelityProbe:
    """Measures steps of one model against its shortcut twin; reusable across a training run.

    ``measure(optimizer, x, y)`` computes g_ref (and ∇L for the baseline) at the current weights,
    takes the optimizer's real step and returns the report: the model has moved by that step.
    """

    def __init__(self, model: nn.Module, reference: Reference = "gradnet", loss_fn: LossFn = F.cross_entropy,
                 baseline: bool = True, seed: Optional[int] = 0, create_graph: bool = False) -> None:
        self.model, self.reference, self.loss_fn = model, reference, loss_fn
        self.baseline, self.seed, self.create_graph = baseline, seed, create_graph
        _select(model, reference)          # fail now on a model or reference that cannot work
        self.names, self.params = trainable_params(model)
        self.stage_of = stage_names(model)
        self.label = reference if isinstance(reference, str) else ",".join(reference)

    def begin(self, inputs: torch.Tensor, targets: torch.Tensor) -> "PendingMeasurement":
        """The passes before a step: g_ref (and ∇L for the baseline) at the current weights, and
        the weights themselves. Take the step, then :meth:`finish`. ``measure`` is these two around
        :func:`optimizer_step`; a training loop with its own step (``dcanets.engine``) calls them
        around that step."""
        ref, ref_loss = reference_gradient(self.model, inputs, targets, self.reference, self.loss_fn, self.seed)
        base, loss = None, None
        if self.baseline:
            base, loss = _gradient(self.model, inputs, targets, self.loss_fn, self.params, self.seed)
        before = [p.detach().clone() for p in self.params]
        return PendingMeasurement(ref, ref_loss, base, loss, before)

    def finish(self, pending: "PendingMeasurement", optimizer: Optional[torch.optim.Optimizer] = None,
               step: Optional[int] = None, step_loss: Optional[float] = None,
               after: Optional[Sequence[torch.Tensor]] = None) -> FidelityReport:
        """The report of the step taken since :meth:`begin`: Δw = current weights − those at ``begin``
        (``after``: the weights after a step taken on a copy of the model, in the same order)."""
        with torch.no_grad():
            delta = [p.detach() - w for p, w in zip(self.params if after is None else after, pending.before)]
        loss = pending.loss if pending.loss is not None else step_loss
        extra: Dict[str, Any] = {}
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        if isinstance(inner, DCAOptimizer):
            extra["diagnostics"] = {k: float(v) for k, v in inner.diagnostics.items() if isinstance(v, (int, float))}
        gap = abs(pending.ref_loss - loss) if loss is not None else None
        return _report(self.names, self.stage_of, delta, pending.ref, pending.base,
                       loss=float("nan") if loss is None else loss, forward_gap=gap,
                       reference=self.label, step=step, extra=extra)

    def measure(self, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                step: Optional[int] = None) -> FidelityReport:
        pending = self.begin(inputs, targets)
        with seeded(self.seed, inputs.device):
            step_loss = optimizer_step(self.model, optimizer, inputs, targets, self.loss_fn, self.create_graph)
        return self.finish(pending, optimizer, step, step_loss)


@dataclass
class PendingMeasurement:
    """What :meth:`FidelityProbe.begin` computed before the step: g_ref and the twin's loss, ∇L and
    the loss (None without a baseline), and the weights before the step."""

    ref: List[torch.Tensor]
    ref_loss: float
    base: Optional[List[torch.Tensor]]
    loss: Optional[float]
    before: List[torch.Tensor]


__all__ = ["REFERENCES", "Reference", "shortcut_twin", "stage_names", "StageFidelity", "FidelityReport",
           "seeded", "trainable_params", "reference_gradient", "optimizer_step", "FidelityProbe",
           "PendingMeasurement"]
