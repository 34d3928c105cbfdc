"""The shortcut family of paper 000 on timm's ResNet: NegNet, plain and gradient-only nets.

Each model is timm's ``ResNet`` with :class:`ShortcutBasicBlock` or :class:`ShortcutBottleneck`,
timm's blocks with the family's merge (``dcanets.layers.shortcut``: ``out = post(F(x)) +
alpha * s(x)``, paper 000, eq. 27) and the block arguments of the family
(``dcanets.layers.shortcut.FAMILY``: negnet, plainnet, gradnet, actresnet).

Plain nets keep the projection modules (unused, so they get no gradient) so that state dicts
and parameter counts are interchangeable with timm's ``resnet18/34/50``. ``zero_init_last``
defaults to False here: zeroing the last BN of each block makes a plain net output a constant.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, cast

import torch
from timm.models import generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl
from dcanets.layers.shortcut import ShortcutMixin, family_args


class ShortcutBasicBlock(ShortcutMixin, BasicBlock):
    last_act = "act2"

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): timm's BasicBlock up to the addition."""
        aa = cast(nn.Module, self.aa)  # timm types create_aa's result as Optional
        x = aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        se = cast(Optional[nn.Module], self.se)  # timm declares it None-typed (built without SE)
        if se is not None:
            x = se(x)
        return x if self.drop_path is None else self.drop_path(x)


class ShortcutBottleneck(ShortcutMixin, Bottleneck):
    last_act = "act3"

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): timm's Bottleneck up to the addition."""
        x = self.act1(self.bn1(self.conv1(x)))
        aa = cast(nn.Module, self.aa)  # timm types create_aa's result as Optional
        x = aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        se = cast(Optional[nn.Module], self.se)  # timm declares it None-typed (built without SE)
        if se is not None:
            x = se(x)
        return x if self.drop_path is None else self.drop_path(x)


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
