"""The shortcut family of paper 000 on timm's ResNet: NegNet, plain and gradient-only nets.

Every block computes ``out = post(F(x)) + alpha * s(x)`` (paper 000, eq. 27), with ``s`` the
identity or the projection shortcut:

* ``alpha = 1``: ResNet; ``alpha = -1``: NegNet; ``alpha = 0``: plain network.
* ``act_placement="after_add"`` is timm's standard block, ``act(F(x) + alpha*s(x))``;
  ``"before_add"`` is ``act(F(x)) + alpha*s(x)``, NegNet's placement (Fig. 2 caption) and the
  ResNet baseline of the authors' public code.
* ``shortcut_grad_only=True`` is the authors' "TestNet": ``act(F(x)) + s(x) - s(x).detach()``,
  whose forward pass is the plain network's and whose backward pass is the ResNet's, the most
  direct test of "DCA + vanilla network = SGD + shortcut network".

Plain nets keep the projection modules (unused, so they get no gradient) so that state dicts
and parameter counts are interchangeable with timm's ``resnet18/34/50``. ``zero_init_last``
defaults to False here: zeroing the last BN of each block makes a plain net output a constant.
"""
from __future__ import annotations

from typing import Any, Callable, List

import torch
from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl

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


class ShortcutMixin:
    """Adds the three shortcut arguments to a timm block and routes its last step to merge().

    A subclass names its final activation (``last_act``) and defines ``residual(x)``, the
    block's F(x) up to, not including, the addition.
    """

    last_act: str

    def __init__(self, *args: Any, shortcut_alpha: float = 1.0, act_placement: str = "after_add",
                 shortcut_grad_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_shortcut_args(shortcut_alpha, act_placement)
        self.shortcut_alpha = float(shortcut_alpha)
        self.act_placement = act_placement
        self.shortcut_grad_only = bool(shortcut_grad_only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = (lambda: x) if self.downsample is None else (lambda: self.downsample(x))
        return merge(self.residual(x), shortcut, getattr(self, self.last_act), self.shortcut_alpha,
                     self.act_placement, self.shortcut_grad_only)

    def extra_repr(self) -> str:
        return (f"shortcut_alpha={self.shortcut_alpha}, act_placement={self.act_placement}, "
                f"shortcut_grad_only={self.shortcut_grad_only}")


class ShortcutBasicBlock(ShortcutMixin, BasicBlock):
    last_act = "act2"

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): timm's BasicBlock up to the addition."""
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        return x if self.drop_path is None else self.drop_path(x)


class ShortcutBottleneck(ShortcutMixin, Bottleneck):
    last_act = "act3"

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): timm's Bottleneck up to the addition."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        return x if self.drop_path is None else self.drop_path(x)


# family -> block arguments; the catalogue of the family in one table
FAMILY = {
    "resnet": dict(shortcut_alpha=1.0, act_placement="after_add"),
    "negnet": dict(shortcut_alpha=-1.0, act_placement="before_add"),
    "plainnet": dict(shortcut_alpha=0.0, act_placement="after_add"),
    "gradnet": dict(shortcut_alpha=1.0, act_placement="before_add", shortcut_grad_only=True),
    "actresnet": dict(shortcut_alpha=1.0, act_placement="before_add"),
}


def family_args(family: str, kwargs: dict) -> dict:
    """Block arguments of a family, overridable per call: create_model(..., shortcut_alpha=-0.5)."""
    args = dict(FAMILY[family])
    for key in ("shortcut_alpha", "act_placement", "shortcut_grad_only"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    return args


def _create(variant: str, pretrained: bool, family: str, block: type, layers: tuple, **kwargs: Any) -> ResNet:
    block_args = dict(kwargs.pop("block_args", None) or {}, **family_args(family, kwargs))
    kwargs.setdefault("zero_init_last", False)
    return build(ResNet, variant, pretrained, block=block, layers=layers, block_args=block_args, **kwargs)


default_cfgs = generate_default_cfgs({
    "negnet18": cfg(), "negnet34": cfg(), "negnet50": cfg(),
    "plainnet18": cfg(), "plainnet34": cfg(), "plainnet50": cfg(),
    "gradnet18": cfg(), "gradnet34": cfg(), "gradnet50": cfg(),
    "actresnet18": cfg(), "actresnet34": cfg(), "actresnet50": cfg(),
})

MODELS = Entrypoints()


@MODELS.add
def negnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """NegNet-18: out = act(F(x)) - s(x) (paper 000, eq. 27, alpha = -1)."""
    model_args = dict(family="negnet", block=ShortcutBasicBlock, layers=(2, 2, 2, 2))
    return _create("negnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def negnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """NegNet-34: out = act(F(x)) - s(x) (paper 000, eq. 27, alpha = -1)."""
    model_args = dict(family="negnet", block=ShortcutBasicBlock, layers=(3, 4, 6, 3))
    return _create("negnet34", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def negnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """NegNet-50: out = act(F(x)) - s(x) (paper 000, eq. 27, alpha = -1)."""
    model_args = dict(family="negnet", block=ShortcutBottleneck, layers=(3, 4, 6, 3))
    return _create("negnet50", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def plainnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Plain-18: ResNet-18 without shortcuts (alpha = 0), same parameters."""
    model_args = dict(family="plainnet", block=ShortcutBasicBlock, layers=(2, 2, 2, 2))
    return _create("plainnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def plainnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Plain-34: ResNet-34 without shortcuts (alpha = 0), same parameters."""
    model_args = dict(family="plainnet", block=ShortcutBasicBlock, layers=(3, 4, 6, 3))
    return _create("plainnet34", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def plainnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Plain-50: ResNet-50 without shortcuts (alpha = 0), same parameters."""
    model_args = dict(family="plainnet", block=ShortcutBottleneck, layers=(3, 4, 6, 3))
    return _create("plainnet50", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def gradnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Gradient-only shortcut net 18 (the authors' TestNet): plain forward, ResNet gradient."""
    model_args = dict(family="gradnet", block=ShortcutBasicBlock, layers=(2, 2, 2, 2))
    return _create("gradnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def gradnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Gradient-only shortcut net 34 (the authors' TestNet): plain forward, ResNet gradient."""
    model_args = dict(family="gradnet", block=ShortcutBasicBlock, layers=(3, 4, 6, 3))
    return _create("gradnet34", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def gradnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Gradient-only shortcut net 50 (the authors' TestNet): plain forward, ResNet gradient."""
    model_args = dict(family="gradnet", block=ShortcutBottleneck, layers=(3, 4, 6, 3))
    return _create("gradnet50", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def actresnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with the authors' baseline block act(F(x)) + s(x)."""
    model_args = dict(family="actresnet", block=ShortcutBasicBlock, layers=(2, 2, 2, 2))
    return _create("actresnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def actresnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 with the authors' baseline block act(F(x)) + s(x)."""
    model_args = dict(family="actresnet", block=ShortcutBasicBlock, layers=(3, 4, 6, 3))
    return _create("actresnet34", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def actresnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with the authors' baseline block act(F(x)) + s(x)."""
    model_args = dict(family="actresnet", block=ShortcutBottleneck, layers=(3, 4, 6, 3))
    return _create("actresnet50", pretrained, **dict(model_args, **kwargs))


@hookimpl
def dcanets_register_models() -> List[Callable[..., ResNet]]:
    return list(MODELS)
