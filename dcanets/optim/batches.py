"""The batch a curvature measurement needs, taken from the loop's own forward and backward.

``rho="auto"`` and ρ > 0 without ``kappa`` measure second derivatives of the loss on the current
batch (``dcanets.optim.rho``). A loop that calls ``remember_batch`` hands the batch over; one that
does not (timm's ``train.py``, any loop written without dcanets in mind) never says what its
inputs, targets and loss are. :class:`BatchRecorder` reads them off the loop's own passes:

- the inputs: a forward hook on the model keeps the input of its last training forward (grad
  enabled, output requiring grad);
- the targets and the loss: a hook on that forward's output keeps the gradient the loop's
  ``loss.backward()`` brings to it, g = ∂L/∂z. For every softmax cross-entropy averaged over the
  batch (hard labels, label smoothing, Mixup/CutMix soft targets: timm's ``CrossEntropyLoss``,
  ``LabelSmoothingCrossEntropy``, ``SoftTargetCrossEntropy``), g = (softmax(z) − t)/N, so the
  targets are t = softmax(z) − N·g, exactly, and cross-entropy against those soft targets
  (:func:`soft_cross_entropy`) has the loop's loss's gradient and Hessian at every weight
  (:func:`implied_targets`). The Hessian in z of such a loss does not depend on t at all, so κ
  (a Gauss–Newton curvature) is exact whatever t is.

A ``GradScaler`` (or anything else that rescales the gradients between backward and step) scales
g too: the step reads the factor as ‖p.grad now‖/‖p.grad after backward‖ of one parameter, as
``ShortcutTap`` does for c. Norm clipping shrinks g the same way and so mixes the targets towards
the prediction (t' = k·t + (1 − k)·softmax(z)): κ is unchanged, ρ="auto"'s λ_min is that of the
mixed targets. A loss of another kind (MSE, BCE, a sum over the batch) does not fit, and the step
says so in one line, naming ``remember_batch``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets.optim.counter import sqnorm
from dcanets.optim.rho import Batch

FIT_TOLERANCE = 0.02  # of a probability: how far from a distribution the read-off targets may be (fp16 outputs)


def soft_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows of probabilities), averaged over the batch."""
    return F.cross_entropy(outputs.float(), targets)


def implied_targets(outputs: torch.Tensor, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
    """(t, "") with t = softmax(z) − N·g, the soft targets of a softmax cross-entropy averaged over
    the N rows of ``outputs`` z whose gradient there is ``grad`` g; (None, why) when g is not the
    gradient of such a loss (its rows do not sum to 0, or t is not a distribution)."""
    if outputs.dim() != 2 or grad.shape != outputs.shape:
        return None, f"the output has shape {tuple(outputs.shape)}, not (batch, classes)"
    z, g = outputs.double(), grad.double()
    n = z.shape[0]
    row_sums = (n * g.sum(dim=1)).abs().max()
    if not bool(torch.isfinite(g).all()):
        return None, "is not finite"
    if float(row_sums) > FIT_TOLERANCE:
        return None, f"has rows summing to {float(row_sums) / n:.3g}, not 0 (no softmax before the loss)"
    t = torch.softmax(z, dim=1) - n * g
    low = float(t.min())
    if low < -FIT_TOLERANCE or float(t.max()) > 1 + FIT_TOLERANCE:
        return None, (f"gives targets in [{low:.3g}, {float(t.max()):.3g}], not probabilities (a loss summed, "
                      "not averaged, over the batch?)")
    t = t.clamp(0.0, 1.0)
    return (t / t.sum(dim=1, keepdim=True)).to(outputs.dtype if outputs.is_floating_point() else torch.float32), ""


class BatchRecorder:
    """The input of the model's last training forward and the gradient its output got in the
    backward that followed (see the module docstring); ``take`` turns them into a :class:`Batch`."""

    def __init__(self, model: nn.Module, params: List[torch.Tensor]) -> None:
        self.model = model
        self.suspended = False           # the optimizer's own measurement passes are not the loop's
        self.clear()
        self._handles = [model.register_forward_hook(self._hook)]
        # one parameter whose .grad tells the factor applied between backward and step (GradScaler)
        self._probe = next((p for p in reversed(params) if p.requires_grad), None)
        if self._probe is not None:
            self._handles.append(self._probe.register_post_accumulate_grad_hook(self._after_backward))

    def __deepcopy__(self, memo: dict) -> "BatchRecorder":
        """A deep copy of the hooked model (an EMA copy, a fidelity twin) gets an inert recorder."""
        inert = object.__new__(type(self))
        inert.suspended, inert._handles, inert._probe = True, [], None
        inert.clear()
        memo[id(self)] = inert
        return inert

    def clear(self) -> None:
        """Forget the recorded pass (after every step: each step measures on its own batch)."""
        self.inputs: Optional[torch.Tensor] = None
        self.outputs: Optional[torch.Tensor] = None
        self.grad: Optional[torch.Tensor] = None
        self._after: Optional[torch.Tensor] = None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.suspended or not torch.is_grad_enabled() or not inputs or not isinstance(inputs[0], torch.Tensor) \
                or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        self.inputs, self.outputs, self.grad, self._after = inputs[0], output.detach(), None, None
        output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        if not self.suspended:
            self.grad = grad.detach()

    def _after_backward(self, p: torch.Tensor) -> None:
        if self.grad is not None and p.grad is not None:
            self._after = sqnorm(p.grad)

    def _scale(self) -> float:
        """The factor applied to the gradients since the backward (1/loss scale after an unscale)."""
        probe, after = self._probe, self._after
        if probe is None or probe.grad is None or after is None:
            return 1.0
        then = float(after)
        return math.sqrt(float(sqnorm(probe.grad)) / then) if then > 0 else 1.0

    def take(self) -> Tuple[Optional[Batch], str]:
        """(the batch, "") of the last recorded forward and backward, then forgotten; (None, why)
        when there is none or its loss does not fit (:func:`implied_targets`)."""
        if self.inputs is None or self.outputs is None:
            return None, "no training forward of the model was seen since the last step"
        if self.grad is None:
            return None, "no loss.backward() through the model's output was seen since its last forward"
        targets, why = implied_targets(self.outputs, self.grad.float() * self._scale())
        inputs = self.inputs
        self.clear()
        if targets is None:
            return None, ("the batch of the model's last forward cannot be read off: the gradient at its output "
                          f"{why}, which a softmax cross-entropy averaged over the batch does not give")
        return Batch(inputs, targets, soft_cross_entropy), ""

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
