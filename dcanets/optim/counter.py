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
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn as nn

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
