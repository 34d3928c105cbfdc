"""The shortcut block of paper 000's family (ResNet, NegNet, plain and gradient-only nets).

Every block computes ``out = post(F(x)) + alpha * s(x)`` (paper 000, eq. 27), with ``s`` the
identity or the projection shortcut:

* ``alpha = 1``: ResNet; ``alpha = -1``: NegNet; ``alpha = 0``: plain network.
* ``act_placement="after_add"`` is timm's standard block, ``act(F(x) + alpha*s(x))``;
  ``"before_add"`` is ``act(F(x)) + alpha*s(x)``, NegNet's placement (Fig. 2 caption) and the
  ResNet baseline of the authors' public code.
* ``shortcut_grad_only=True`` is the authors' "TestNet": ``act(F(x)) + s(x) - s(x).detach()``,
  whose forward pass is the plain network's and whose backward pass is the ResNet's, the most
  direct test of "DCA + vanilla network = SGD + shortcut network".

This module is the contract (as timm keeps its blocks in ``timm.layers``): :class:`ShortcutBlock`
says what a block has, :func:`merge` and :func:`block_forward` what it computes,
:class:`ShortcutMixin` adds it to a timm block, :data:`FAMILY` names the block arguments of each
family. The plugins ``shortcut`` and ``cifar_shortcut`` assemble models from it;
``dcanets.analysis`` finds the blocks (:func:`shortcut_blocks`) and switches them to their
gradnet twin (:func:`merging_as`) through it.

Training NegNet (and ``actresnet``) goes through a fused block tail, :class:`ReluTail` with
:class:`InputTap`: merge()'s forward bit for bit and its gradients (but for one rounding case,
see :class:`ReluTail`), without the extra activation tensor and the extra ``-g`` pass per block
that autograd spends on ``act(F(x)) - s(x)``. See :func:`block_forward`; :func:`unfused`
switches it off (process-wide, for comparisons).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn as nn

from dcanets._compat import autograd_transforms_active, has_forward_hooks

ACT_PLACEMENTS = ("after_add", "before_add")


def check_shortcut_args(alpha: float, act_placement: str) -> None:
    if act_placement not in ACT_PLACEMENTS:
        raise ValueError(f"act_placement must be one of {ACT_PLACEMENTS}, got {act_placement!r}")
    if not isinstance(alpha, (int, float)):
        raise ValueError(f"shortcut_alpha must be a number, got {alpha!r}")


def merge(
    branch: torch.Tensor,
    shortcut: Callable[[], torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    act_placement: str,
    grad_only: bool,
) -> torch.Tensor:
    """Combine the residual branch F(x) with alpha * s(x); the one place the family differs.

    ``shortcut`` is a thunk so a plain block (alpha = 0) never computes s(x).
    """
    if act_placement == "before_add":
        branch = act(branch)
    if grad_only:
        s = shortcut()
        # value: exactly 0; gradient: alpha * ds/dx, the shortcut's gradient without its signal
        branch = branch + alpha * (s - s.detach())
    elif alpha != 0:
        s = shortcut()
        if act_placement == "before_add":  # branch is the activation's saved output: no in-place
            branch = torch.add(branch, s, alpha=alpha)
        else:
            branch = branch.add_(s, alpha=alpha)
    if act_placement == "after_add":
        branch = act(branch)
    return branch


@runtime_checkable
class ShortcutBlock(Protocol):
    """A block of the family: F(x) (``residual``), s(x)'s module (``downsample``: None for the
    identity), the merge arguments and the name of its final activation. :func:`block_forward` runs
    it; :func:`shortcut_blocks` finds it in a model (``isinstance(module, ShortcutBlock)``)."""

    downsample: Optional[nn.Module]
    shortcut_alpha: float
    act_placement: str
    shortcut_grad_only: bool
    last_act: str

    def residual(self, x: torch.Tensor) -> torch.Tensor: ...


_FUSED = [True]  # switched off by unfused()


@contextmanager
def unfused() -> Iterator[None]:
    """Within this context every shortcut block runs :func:`merge`, the reference path the fused
    tail is tested and benchmarked against."""
    _FUSED[0] = False
    try:
        yield
    finally:
        _FUSED[0] = True


def block_forward(block: ShortcutBlock, x: torch.Tensor) -> torch.Tensor:
    """A shortcut-family block: ``merge(F(x), s(x))``, through the fused ReLU tail when it applies.

    The fused tail gives the same output and, in fp32/fp64, the same gradients as :func:`merge`
    (see :class:`ReluTail` for the one documented rounding-level exception); every case it does
    not cover takes :func:`merge` itself.
    """
    act = getattr(block, block.last_act)
    if _fusable(block, act, x):
        return _fused_forward(block, act, x)
    return _merge_block(block, act, block.residual(x), x)


def _merge_block(block: ShortcutBlock, act: nn.Module, y: torch.Tensor, x: torch.Tensor,
                 s: Optional[torch.Tensor] = None) -> torch.Tensor:
    """merge() with the block's arguments; ``s`` is s(x) when it was computed already."""
    return merge(y, _shortcut_thunk(block, x, s), act, block.shortcut_alpha, block.act_placement,
                 block.shortcut_grad_only)


def _shortcut_thunk(block: ShortcutBlock, x: torch.Tensor, s: Optional[torch.Tensor]) -> Callable[[], torch.Tensor]:
    down = block.downsample
    if s is not None:
        return lambda: s
    return (lambda: x) if down is None else (lambda: down(x))


def _fused_forward(block: ShortcutBlock, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F(x) on the tapped input, then the fused tail (merge() if F changed the shape or dtype)."""
    alpha, tapped = block.shortcut_alpha, block.downsample is None and x.requires_grad
    x_branch, x_short = InputTap.apply(x, alpha) if tapped else (x, x)
    y = block.residual(x_branch)
    s = x_short if block.downsample is None else block.downsample(x)
    if y.shape != s.shape or y.dtype != s.dtype:
        # fed the untapped x: the tap's unused second output gets no gradient, so none is lost
        return _merge_block(block, act, y, x, None if block.downsample is None else s)
    return ReluTail.apply(y, s, alpha, tapped)


def _fusable(block: ShortcutBlock, act: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused tail stands in for merge() here; the conditions and why:

    - act(F(x)) + alpha*s(x), the signal through the shortcut: the only merge it implements;
    - alpha = +-1: alpha*s is exact, so act(F(x)) = out - alpha*s finds every zero of the ReLU;
    - an in-place ``nn.ReLU`` no hook watches: merge() overwrites F(x) too, and the tail applies
      the ReLU without calling the module;
    - grad mode: without a backward there is nothing to save;
    - fp32/fp64, no autocast: in bf16/fp16 the sum would round away far more of act(F(x));
    - eager autograd: torch.compile fuses merge()'s ops itself, and torch.func transforms and
      forward-mode AD need rules the tail does not define.
    """
    if torch.compiler.is_compiling():  # first: dynamo need not trace the rest
        return False
    return (_FUSED[0] and block.act_placement == "before_add" and not block.shortcut_grad_only
            and abs(block.shortcut_alpha) == 1.0 and type(act) is nn.ReLU and act.inplace
            and not has_forward_hooks(act)
            and torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type) and not autograd_transforms_active())


class InputTap(torch.autograd.Function):
    """x -> (x, x), the branch's input and the shortcut's, whose backward adds their gradients as
    ``d + alpha * g``, one fused pass.

    Why: left to autograd, the shortcut's gradient ``alpha * g`` is one more full-size tensor per
    block (a ResNet passes ``g`` through for free) before the engine adds it to the branch's ``d``.
    Here :class:`ReluTail` hands ``g`` to the second output unscaled and this node scales it
    inside the sum. Only the tail ever sees the second output, so the unscaled gradient never
    leaves this pair; ``d + (-1)*g`` rounds exactly as ``(-g) + d`` does.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.alpha = alpha
        ctx.set_materialize_grads(False)  # an unused shortcut output (the fallback) sends None
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx: Any, d: Optional[torch.Tensor], g: Optional[torch.Tensor]) -> Tuple[Any, None]:
        if g is None:
            return d, None
        if d is None:
            return _scaled(g, ctx.alpha), None
        return torch.add(d, g, alpha=ctx.alpha), None


class ReluTail(torch.autograd.Function):
    """``out = relu(y) + alpha * s`` for alpha = +-1, computed in place in y, saving no new tensor.

    Why: autograd's ``torch.add(relu_(y), s, alpha=alpha)`` keeps relu(y) alive for the ReLU's
    backward, next to the block's output: one activation tensor per block more than a ResNet,
    whose ReLU output is the block output. Here the backward recovers relu(y) = out - alpha*s
    from the output and the shortcut, which the next block's and this block's convolutions keep
    anyway (one elementwise pass instead of a stored tensor). The forward is bitwise that of
    merge(); relu(y) = 0 gives out = alpha*s exactly (finite s), so every zero of the ReLU is
    found again, and the backward is bitwise merge()'s but for one case.

    The exception: where 0 < relu(y) < about 2^-24 |s| (fp32; 2^-53 in fp64), the sum rounded
    relu(y) away (out = alpha*s exactly, as if y were 0), and this backward takes the ReLU's
    derivative there as 0, the derivative of the rounded forward, where merge() takes 1. Measured
    on cifar_negnet56 and cifar_actresnet56 at batch 128: 0 to 3 elements of 3.3*10^7 per step.
    Such an element's gradient differs by its full value; on cifar_negnet56 at batch 128 one or
    two of them moved the worst parameter gradient by 1.5*10^-3 (relative L2; the median one by
    0 to 2*10^-5), where merge() itself moves its gradients by 1 to 2.5*10^-2 between the NCHW and
    the channels-last layout. ``unfused()`` gives merge()'s exact numbers.

    ``tapped``: s comes from :class:`InputTap`, which scales its gradient by alpha itself.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor, alpha: float, tapped: bool) -> torch.Tensor:
        ctx.alpha, ctx.tapped = alpha, tapped
        ctx.set_materialize_grads(False)
        out = y.relu_().add_(s, alpha=alpha)
        ctx.mark_dirty(y)
        ctx.save_for_backward(out, s)
        return out

    @staticmethod
    def backward(ctx: Any, g: Optional[torch.Tensor]) -> Tuple[Any, Any, None, None]:
        if g is None:
            return None, None, None, None
        out, s = ctx.saved_tensors
        g = _layout_of(out, g)
        grad_y = _relu_grad(g, out, s, ctx.alpha) if ctx.needs_input_grad[0] else None
        grad_s = (g if ctx.tapped else _scaled(g, ctx.alpha)) if ctx.needs_input_grad[1] else None
        return grad_y, grad_s, None, None


_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward  # the ReLU's own backward kernel


def _relu_grad(g: torch.Tensor, out: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """g where relu(y) = out - alpha*s is positive, else 0."""
    if torch.is_grad_enabled():  # a backward with create_graph: differentiable in g only, no out=
        return _THRESHOLD_BACKWARD.default(g, torch.add(out.detach(), s.detach(), alpha=-alpha), 0)
    act = torch.add(out, s, alpha=-alpha)
    return _THRESHOLD_BACKWARD.grad_input(g, act, 0, grad_input=act)


def _scaled(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * g as autograd's add computes it: g itself for alpha = 1."""
    return g if alpha == 1 else g * alpha


def _layout_of(ref: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g in ref's channels-last layout, if ref has it and g does not.

    Why: the pooled head, and a pad shortcut's backward, hand back NCHW gradients even in a
    channels-last net; this block's two elementwise kernels would then mix layouts, several times
    slower than one copy. (merge() let that NCHW gradient run through every block below: the main
    cost of channels-last NegNet before the fused tail.)
    """
    cl = torch.channels_last
    if ref.dim() == 4 and ref.is_contiguous(memory_format=cl) and not g.is_contiguous(memory_format=cl):
        return g.contiguous(memory_format=cl)
    return g


class ShortcutMixin:
    """Adds the three shortcut arguments to a timm block and routes its forward to block_forward().

    A subclass names its final activation (``last_act``) and defines ``residual(x)``, the
    block's F(x) up to, not including, the addition.
    """

    last_act: str
    downsample: Optional[nn.Module]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self, *args: Any, shortcut_alpha: float = 1.0, act_placement: str = "after_add",
                 shortcut_grad_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_shortcut_args(shortcut_alpha, act_placement)
        self.shortcut_alpha = float(shortcut_alpha)
        self.act_placement = act_placement
        self.shortcut_grad_only = bool(shortcut_grad_only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x)

    def extra_repr(self) -> str:
        return (f"shortcut_alpha={self.shortcut_alpha}, act_placement={self.act_placement}, "
                f"shortcut_grad_only={self.shortcut_grad_only}")


@dataclass(frozen=True)
class BlockArgs:
    """The merge arguments of a block (the keyword arguments of :class:`ShortcutMixin`)."""

    shortcut_alpha: float
    act_placement: str
    shortcut_grad_only: bool = False

    @staticmethod
    def of(block: ShortcutBlock) -> "BlockArgs":
        return BlockArgs(block.shortcut_alpha, block.act_placement, block.shortcut_grad_only)

    def apply(self, block: ShortcutBlock) -> None:
        """Make ``block`` merge with these arguments (its weights unchanged)."""
        block.shortcut_alpha = float(self.shortcut_alpha)
        block.act_placement = self.act_placement
        block.shortcut_grad_only = bool(self.shortcut_grad_only)


# family -> block arguments; the catalogue of the family in one table
FAMILY: Dict[str, Dict[str, Any]] = {
    "resnet": dict(shortcut_alpha=1.0, act_placement="after_add"),
    "negnet": dict(shortcut_alpha=-1.0, act_placement="before_add"),
    "plainnet": dict(shortcut_alpha=0.0, act_placement="after_add"),
    "gradnet": dict(shortcut_alpha=1.0, act_placement="before_add", shortcut_grad_only=True),
    "actresnet": dict(shortcut_alpha=1.0, act_placement="before_add"),
}


def family_args(family: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Block arguments of a family, overridable per call: create_model(..., shortcut_alpha=-0.5)
    (the overrides are taken out of ``kwargs``)."""
    args = dict(FAMILY[family])
    for key in ("shortcut_alpha", "act_placement", "shortcut_grad_only"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    return args


def shortcut_blocks(model: nn.Module) -> List[Tuple[str, ShortcutBlock]]:
    """The model's blocks of the family (named, in registration = forward order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShortcutBlock)]


def is_plain(block: ShortcutBlock) -> bool:
    """No shortcut in either pass (alpha = 0, not gradient-only)."""
    return float(block.shortcut_alpha) == 0.0 and not block.shortcut_grad_only


@contextmanager
def merging_as(blocks: Sequence[ShortcutBlock], family: str) -> Iterator[None]:
    """Within the block, each of ``blocks`` merges as ``family``'s blocks do (``"gradnet"``: the
    plain forward with the shortcut's gradient); their own arguments come back on exit."""
    saved = [(b, BlockArgs.of(b)) for b in blocks]
    twin = BlockArgs(**FAMILY[family])
    try:
        for b in blocks:
            twin.apply(b)
        yield
    finally:
        for b, args in saved:
            args.apply(b)


__all__ = ["ACT_PLACEMENTS", "FAMILY", "BlockArgs", "ShortcutBlock", "ShortcutMixin", "InputTap", "ReluTail",
           "block_forward", "check_shortcut_args", "family_args", "is_plain", "merge", "merging_as",
           "shortcut_blocks", "unfused"]
