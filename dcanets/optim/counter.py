"""The counter loss L'_α = L(α h^L + (1 − α) h^{L−1}) on any timm model (paper 000, eq. 10).

A block is a direct child of an ``nn.Sequential`` (a timm/CIFAR stage) that has parameters and
whose output has the shape of its input: its input is h^{L−1}, its output h^L. A forward hook on
the block returns ``α·out + (1 − α)·in`` while a counter loss is being evaluated and leaves the
block alone otherwise, so the model class is never changed and the training closure is reused
as is: L'_α is the closure's loss run with the hook active (``evaluate``).

α = 0 skips the block: ∇L'_0 is the gradient of the *network with the block removed*,
∂L/∂h evaluated at h^{L−1} (not at h^L) times ∂h^{L−1}/∂w, plus the head's gradient at the
features h^{L−1}. That is **not** the c of paper 000, eq. 17 (C = (0, ∂_w F^{L−2}): the
shortcut's part of the gradient, ∂L/∂h^L·∂h^{L−1}/∂w, zero on the head and on the block).
Eq. 17's c comes from ``cutting``: one ordinary forward with the graph cut at h^{L−1}, after
which ``cut["grad_out"]`` = ∂L/∂h^L is the cotangent to pull back through the trunk.

``where="last"`` mixes at the last same-shape block (the paper's one-block derivation; the
only mode the optimizers accept). ``where="all"`` mixes at every same-shape block at once: a
different network (every block removed for α = 0), kept here as a building block for analysis;
the optimizers refuse it (on cifar_plainnet56 it gave ‖c‖/‖a‖ ≈ 0.0013 and β ≈ 3·10⁵).

Shapes are only known once data flows, so the same-shape test happens on the first forward
pass after ``attach``; a model with no candidate block raises at once, a model whose
candidates all change shape raises on that first pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from dcanets._compat import will_engine_execute_node

WHERE = ("last", "all")


def _candidates(model: nn.Module) -> List[nn.Module]:
    """Direct children of every nn.Sequential that own parameters, in registration order."""
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for child in module.children():
                has_params = any(True for _ in child.parameters())
                if has_params and id(child) not in seen:
                    seen.add(id(child))
                    found.append(child)
    return found


class CounterLoss:
    """Forward hooks that turn a model's loss L into the counter loss L'_α on demand."""

    def __init__(self, model: nn.Module, where: str = "last") -> None:
        if where not in WHERE:
            raise ValueError(f"where must be one of {', '.join(WHERE)}; got {where!r}")
        candidates = _candidates(model)
        if not candidates:
            raise ValueError(
                f"model {type(model).__name__} has no same-shape blocks for the counter loss: it "
                "needs blocks inside an nn.Sequential (a stage) whose output has the shape of "
                "their input; use dcal2 or dcaprox for this model"
            )
        self.model, self.where = model, where
        self.alpha: Optional[float] = None
        self._order: List[nn.Module] = []     # same-shape blocks in forward order (first pass)
        self._probing = True
        self._handles = [m.register_forward_hook(self._hook) for m in candidates]
        self._handles += [m.register_forward_pre_hook(self._pre_hook) for m in candidates]
        self._ncand = len(candidates)
        self._cutting = False
        self.cut: dict = {}

    # -- hooks --------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, inputs: tuple):
        if not self._cutting or module is not self._order[-1]:
            return None
        # cut the graph at h^{L−1}: the closure's backward stops here and leaves the trunk's
        # graph alive for the vector–Jacobian products taken afterwards
        h = inputs[0]
        leaf = h.detach().requires_grad_(True)
        self.cut = {"h": h, "leaf": leaf}
        return (leaf,) + tuple(inputs[1:])

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if self._cutting and module is self._order[-1]:
            output.register_hook(lambda g: self.cut.__setitem__("grad_out", g))   # ∂L/∂h^L
            return None
        if self._probing:
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) \
                    and x.shape == output.shape and module not in self._order:
                self._order.append(module)
            return None
        if self.alpha is None or module not in self.active_blocks:
            return None
        # paper 000, eq. 10: the block's output becomes α h^L + (1 − α) h^{L−1}
        return self.alpha * output + (1.0 - self.alpha) * inputs[0]

    def observe(self) -> None:
        """End the first (probing) pass: from now on the same-shape blocks are known."""
        if not self._probing:
            return
        self._probing = False
        if not self._order:
            self.detach()
            raise ValueError(
                f"model {type(self.model).__name__} has no same-shape blocks for the counter "
                f"loss: none of its {self._ncand} stage blocks keeps the shape of its input; "
                "use dcal2 or dcaprox for this model"
            )

    @property
    def probing(self) -> bool:
        """True until the first pass (ended by ``observe``) has found the same-shape blocks."""
        return self._probing

    @property
    def active_blocks(self) -> List[nn.Module]:
        return self._order[-1:] if self.where == "last" else list(self._order)

    @contextmanager
    def mixing(self, alpha: float) -> Iterator[None]:
        """Within the block, forward passes compute L'_α instead of L."""
        if self._probing:
            raise RuntimeError("run one ordinary forward pass before evaluating a counter loss")
        self.alpha = float(alpha)
        try:
            yield
        finally:
            self.alpha = None

    @contextmanager
    def cutting(self) -> Iterator[None]:
        """Within the block, the forward pass cuts the graph at the last block's input; after
        backward, ``self.cut`` holds h^{L−1} (with the trunk's graph), ``leaf.grad`` (the
        gradient reaching h^{L−1} through the block) and ``grad_out`` = ∂L/∂h^L."""
        if self._probing:
            raise RuntimeError("run one ordinary forward pass before cutting the graph")
        self._cutting, self.cut = True, {}
        try:
            yield
        finally:
            self._cutting = False

    def evaluate(self, closure: Callable[[], torch.Tensor], alpha: float) -> torch.Tensor:
        """Run the training closure (zero grads, forward, loss, backward) on L'_α."""
        if alpha == 1.0:
            return closure()
        with torch.enable_grad(), self.mixing(alpha):
            return closure()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# -- eq. 17's c during an ordinary loss.backward() ------------------------------------------------

def _plain_backward(node: torch.autograd.graph.Node) -> bool:
    """True inside a ``loss.backward()`` that accumulates into every leaf's ``.grad``; False inside
    ``torch.autograd.grad`` (a curvature or fidelity probe) or ``backward(inputs=...)``.

    ``node`` is the AccumulateGrad node of a private sentinel leaf that no caller ever names as an
    input, so the engine executes it only when no ``inputs`` restrict the pass. Only a private
    PyTorch call answers this (``dcanets._compat.will_engine_execute_node``)."""
    return will_engine_execute_node(node)


class _Forward:
    """One forward pass through the tapped block: ∂L/∂h^L arrives here during backward."""

    def __init__(self, tap: "ShortcutTap", module: nn.Module) -> None:
        self.tap, self.module = tap, module
        self.grad_out: Optional[torch.Tensor] = None

    def keep_grad_out(self, grad: torch.Tensor) -> None:
        self.grad_out = grad


class _TapFn(torch.autograd.Function):
    """Identity on h^{L−1} (a copy, so an in-place op of the block cannot reach h^{L−1}) whose
    backward hands the incoming cotangent to ``ShortcutTap.backward``: that is the moment the
    block and everything above it are done and the trunk below has not run yet."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, sentinel: torch.Tensor, record: _Forward) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.record = record
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        return ctx.record.tap.backward(ctx.record, h, grad), None, None


class ShortcutTap:
    """Eq. 17's c (or a fused direction) computed during the training loop's own ``loss.backward()``.

    The block's input h^{L−1} passes through ``_TapFn`` and a tensor hook keeps ∂L/∂h^L. When the
    ordinary backward reaches h^{L−1} with the cotangent g_in (which becomes a's trunk part), the tap

    - separate mode (``ratio()`` is None): pulls ∂L/∂h^L back through the trunk with one extra
      vector–Jacobian product, c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L, and lets g_in continue unchanged, so
      ``p.grad`` ends as ∇L exactly as without the tap;
    - fused mode (``ratio()`` = r): replaces g_in by g_in + r·∂L/∂h^L, so ``p.grad`` ends as a + r·c
      with no extra product (constant or reused coefficients).

    c accumulates over backward passes like ``p.grad`` and restarts when the trunk's ``p.grad`` was
    reset (None) before the pass, or by ``clear``. ``take`` hands the recorded pass(es) to the step
    and rescales c per parameter by ‖p.grad now‖/‖p.grad after backward‖, so an unscale
    (GradScaler) or norm clipping of the gradients between backward and step acts on c too.
    Only a plain ``loss.backward()`` is tapped (``_plain_backward``)."""

    def __init__(self, counter: CounterLoss, params: List[torch.Tensor],
                 ratio: Callable[[], Optional[float]]) -> None:
        self.counter, self.params, self.ratio = counter, params, ratio
        self.suspended, self.seen_forward = False, False
        self._sentinel = torch.zeros((), requires_grad=True)
        self._open: dict = {}                       # id(module) -> its _Forward, pre-hook to hook
        self.clear()
        self._grad_hooks: dict = {}                 # index -> post-accumulate-grad hook handle
        modules = _candidates(counter.model)
        self._handles = [m.register_forward_pre_hook(self._pre_hook) for m in modules]
        self._handles += [m.register_forward_hook(self._hook) for m in modules]

    def __deepcopy__(self, memo: dict) -> "ShortcutTap":
        """A deep copy of the hooked model (a reference net, a fidelity twin) gets inert hooks:
        the tap serves the optimizer's own model only."""
        inert = object.__new__(type(self))
        inert.suspended, inert._open, inert._handles, inert._grad_hooks = True, {}, [], {}
        memo[id(self)] = inert
        return inert

    def clear(self) -> None:
        """Forget what the backward passes since the last step recorded."""
        self.c: Optional[List[Optional[torch.Tensor]]] = None
        self.averaged = False                       # make_global ran on this c (data parallel)
        self.fused: Optional[float] = None
        self._after: Dict[int, torch.Tensor] = {}   # ‖p.grad‖² at the end of the last backward

    # -- forward ------------------------------------------------------------------------------
    def _targets(self, module: nn.Module) -> bool:
        if self.suspended or not torch.is_grad_enabled():
            return False
        counter = self.counter
        if counter._cutting or counter.alpha is not None:
            return False
        return counter.probing or module is counter._order[-1]

    def _pre_hook(self, module: nn.Module, inputs: tuple):
        if not self._targets(module) or not inputs or not isinstance(inputs[0], torch.Tensor):
            return None
        self.seen_forward = True
        record = _Forward(self, module)
        self._open[id(module)] = record
        return (_TapFn.apply(inputs[0], self._sentinel, record),) + tuple(inputs[1:])

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        record = self._open.pop(id(module), None)
        if record is not None and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(record.keep_grad_out)

    # -- backward -----------------------------------------------------------------------------
    def backward(self, record: _Forward, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The cotangent that continues into the trunk (see the class docstring)."""
        order = self.counter._order
        if not order or record.module is not order[-1] or record.grad_out is None \
                or not _plain_backward(torch.autograd.graph.get_gradient_edge(self._sentinel).node):
            return grad
        r = self.ratio()
        if r is not None:
            self.fused = r
            return grad + r * record.grad_out if r != 0 else grad
        self._accumulate(self.vjp(h, record.grad_out))
        return grad

    def vjp(self, h: torch.Tensor, grad_out: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L; None where h^{L−1} does not depend on the parameter."""
        live = [i for i, p in enumerate(self.params) if p.requires_grad]
        c: List[Optional[torch.Tensor]] = [None] * len(self.params)
        if not h.requires_grad or not live:
            return c
        got = torch.autograd.grad(h, [self.params[i] for i in live], grad_out,
                                  retain_graph=True, allow_unused=True)
        for i, g in zip(live, got):
            c[i] = g
        return c

    def _accumulate(self, c: List[Optional[torch.Tensor]]) -> None:
        """Add this pass's c to the recorded one, or start afresh if the trunk's gradients were
        reset since (the trunk's ``.grad`` is accumulated after this, further down the pass)."""
        trunk = [i for i, ci in enumerate(c) if ci is not None]
        if self.c is not None and all(self.params[i].grad is not None for i in trunk):
            self.c = [x if y is None else (y if x is None else x + y) for x, y in zip(self.c, c)]
        else:
            self.c = c
        for i in trunk:
            if i not in self._grad_hooks:
                self._grad_hooks[i] = self.params[i].register_post_accumulate_grad_hook(
                    lambda p, i=i: self._after_backward(i, p))

    def _after_backward(self, i: int, p: torch.Tensor) -> None:
        if self.c is not None and p.grad is not None:
            self._after[i] = sqnorm(p.grad)

    def make_global(self, mean: Callable[[List[Optional[torch.Tensor]]], List[Optional[torch.Tensor]]]) -> None:
        """Data parallel, once DDP has averaged ``p.grad``: c averaged over the ranks by ``mean``
        (dcanets.optim.distributed), and the gradient norms ``take`` compares with read again from
        the averaged ``p.grad`` (those of the backward were this rank's own)."""
        if self.c is None:
            return
        self.c = mean(self.c)
        self.averaged = True
        for i in self._after:
            grad = self.params[i].grad
            if grad is not None:
                self._after[i] = sqnorm(grad)

    # -- the step -----------------------------------------------------------------------------
    def take(self) -> Tuple[Optional[float], Optional[List[Optional[torch.Tensor]]]]:
        """(r, None) after fused passes, (None, c) after separate ones, (None, None) if no
        ``loss.backward()`` went through the block since the last step; then ``clear``."""
        fused, c, after = self.fused, self.c, self._after
        self.clear()
        if fused is not None or c is None:
            return fused, None
        for i, ci in enumerate(c):
            grad = self.params[i].grad
            if ci is not None and i in after and grad is not None:
                then = after[i]        # exactly 1 when p.grad is untouched since the backward
                scale = torch.where(then > 0, (sqnorm(grad) / then).sqrt(), torch.ones_like(then))
                c[i] = ci * scale.to(ci.dtype)
        return None, c

    def detach(self) -> None:
        for h in self._handles + list(self._grad_hooks.values()):
            h.remove()
        self._handles, self._grad_hooks = [], {}


def sqnorm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖² in float64, as a 0-dim tensor (no host sync on a GPU)."""
    return torch.linalg.vector_norm(v.detach(), dtype=torch.float64).square()
