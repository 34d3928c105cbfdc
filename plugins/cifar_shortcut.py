"""CIFAR-style shortcut networks: He et al. 2015's 6n+2 family and the 3x3-stem 18-layer net.

* ``cifar_<family><6n+2>``: 3x3 stem, three stages of 16/32/64 channels with n basic blocks
  each, the parameter-free zero-padding shortcut ("option A") where the shape changes, so
  plain and shortcut nets have the same parameters (0.27M for depth 20 ... 1.7M for 110).
* ``cifar_<family>18``: the 18-layer net of the common pytorch-cifar training code (and of the
  NegNet authors' fork): 64-channel 3x3 stem with stride 1, no max-pool, stages of
  64/128/256/512 channels, projection shortcuts (1x1 conv + BN).

Families (``negnet``, ``resnet``, ``plainnet``, ``gradnet``, ``actresnet``), the block arguments
they set and the block's merge are those of :mod:`dcanets.layers.shortcut`.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import generate_default_cfgs

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl
from dcanets.layers.shortcut import ShortcutMixin, family_args


class PadShortcut(nn.Module):
    """He et al. 2015 option A: subsample by the stride and zero-pad the new channels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarBlock(ShortcutMixin, nn.Module):
    """conv3x3-BN-act-conv3x3-BN, merged with the shortcut as the whole family does."""

    last_act = "act2"

    def __init__(self, in_chs: int, out_chs: int, stride: int, shortcut_type: str,
                 shortcut_alpha: float = 1.0, act_placement: str = "after_add",
                 shortcut_grad_only: bool = False, act_layer: type = nn.ReLU) -> None:
        super().__init__(shortcut_alpha=shortcut_alpha, act_placement=act_placement,
                         shortcut_grad_only=shortcut_grad_only)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = act_layer(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = PadShortcut(in_chs, out_chs, stride) if shortcut_type == "pad" else nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): conv3x3-BN-act-conv3x3-BN, up to the addition."""
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class CifarShortcutNet(nn.Module):
    """3x3 stem (stride 1, no pooling), stages of CifarBlocks, global pool, linear head."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], shortcut_type: str = "pad",
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, act_layer: type = nn.ReLU, **block_args: Any) -> None:
        super().__init__()
        if shortcut_type not in ("pad", "conv"):
            raise ValueError(f"shortcut_type must be 'pad' or 'conv', got {shortcut_type!r}")
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = act_layer(inplace=True)
        self.feature_info: List[dict] = [dict(num_chs=widths[0], reduction=1, module="act1")]
        in_chs = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            blocks = [CifarBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1,
                                 shortcut_type, act_layer=act_layer, **block_args) for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f"layer{i + 1}"))
            in_chs = width
        self.num_stages = len(widths)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        for m in self.modules():  # He et al. 2015 initialisation, as in the reference code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool, family: str, **kwargs: Any) -> CifarShortcutNet:
    kwargs.update(family_args(family, kwargs))
    every_stage = dict(out_indices=tuple(range(len(kwargs["widths"]) + 1)))  # stem + each stage
    return build(CifarShortcutNet, variant, pretrained, feature_cfg=every_stage, **kwargs)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cfg(pool: int = 8) -> dict:
    """32x32 inputs; the last stage is 8x8 for the 6n+2 nets and 4x4 for the 18-layer net."""
    return cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(pool, pool), crop_pct=1.0,
               mean=CIFAR_MEAN, std=CIFAR_STD)


default_cfgs = generate_default_cfgs({
    "cifar_resnet18": _cfg(pool=4), "cifar_resnet20": _cfg(), "cifar_resnet32": _cfg(),
    "cifar_resnet44": _cfg(), "cifar_resnet56": _cfg(), "cifar_resnet110": _cfg(),
    "cifar_negnet18": _cfg(pool=4), "cifar_negnet20": _cfg(), "cifar_negnet32": _cfg(),
    "cifar_negnet44": _cfg(), "cifar_negnet56": _cfg(), "cifar_negnet110": _cfg(),
    "cifar_plainnet18": _cfg(pool=4), "cifar_plainnet20": _cfg(), "cifar_plainnet32": _cfg(),
    "cifar_plainnet44": _cfg(), "cifar_plainnet56": _cfg(), "cifar_plainnet110": _cfg(),
    "cifar_gradnet18": _cfg(pool=4), "cifar_gradnet20": _cfg(), "cifar_gradnet32": _cfg(),
    "cifar_gradnet44": _cfg(), "cifar_gradnet56": _cfg(), "cifar_gradnet110": _cfg(),
    "cifar_actresnet18": _cfg(pool=4), "cifar_actresnet20": _cfg(), "cifar_actresnet32": _cfg(),
    "cifar_actresnet44": _cfg(), "cifar_actresnet56": _cfg(), "cifar_actresnet110": _cfg(),
})

MODELS = Entrypoints()


@MODELS.add
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-18: the 3x3-stem 18-layer net of pytorch-cifar, projection shortcuts."""
    model_args = dict(family="resnet", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut_type="conv")
    return _create("cifar_resnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-20: He et al. 2015's 6n+2 net with n = 3, zero-padding shortcuts."""
    model_args = dict(family="resnet", widths=(16, 32, 64), depths=(3, 3, 3), shortcut_type="pad")
    return _create("cifar_resnet20", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-32: He et al. 2015's 6n+2 net with n = 5, zero-padding shortcuts."""
    model_args = dict(family="resnet", widths=(16, 32, 64), depths=(5, 5, 5), shortcut_type="pad")
    return _create("cifar_resnet32", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-44: He et al. 2015's 6n+2 net with n = 7, zero-padding shortcuts."""
    model_args = dict(family="resnet", widths=(16, 32, 64), depths=(7, 7, 7), shortcut_type="pad")
    return _create("cifar_resnet44", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-56: He et al. 2015's 6n+2 net with n = 9, zero-padding shortcuts."""
    model_args = dict(family="resnet", widths=(16, 32, 64), depths=(9, 9, 9), shortcut_type="pad")
    return _create("cifar_resnet56", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-110: He et al. 2015's 6n+2 net with n = 18, zero-padding shortcuts."""
    model_args = dict(family="resnet", widths=(16, 32, 64), depths=(18, 18, 18), shortcut_type="pad")
    return _create("cifar_resnet110", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet18(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-18: the 3x3-stem 18-layer net of pytorch-cifar, projection shortcuts."""
    model_args = dict(family="negnet", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut_type="conv")
    return _create("cifar_negnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet20(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-20: He et al. 2015's 6n+2 net with n = 3, zero-padding shortcuts."""
    model_args = dict(family="negnet", widths=(16, 32, 64), depths=(3, 3, 3), shortcut_type="pad")
    return _create("cifar_negnet20", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet32(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-32: He et al. 2015's 6n+2 net with n = 5, zero-padding shortcuts."""
    model_args = dict(family="negnet", widths=(16, 32, 64), depths=(5, 5, 5), shortcut_type="pad")
    return _create("cifar_negnet32", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet44(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-44: He et al. 2015's 6n+2 net with n = 7, zero-padding shortcuts."""
    model_args = dict(family="negnet", widths=(16, 32, 64), depths=(7, 7, 7), shortcut_type="pad")
    return _create("cifar_negnet44", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet56(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-56: He et al. 2015's 6n+2 net with n = 9, zero-padding shortcuts."""
    model_args = dict(family="negnet", widths=(16, 32, 64), depths=(9, 9, 9), shortcut_type="pad")
    return _create("cifar_negnet56", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_negnet110(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR NegNet-110: He et al. 2015's 6n+2 net with n = 18, zero-padding shortcuts."""
    model_args = dict(family="negnet", widths=(16, 32, 64), depths=(18, 18, 18), shortcut_type="pad")
    return _create("cifar_negnet110", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet18(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-18: the 3x3-stem 18-layer net of pytorch-cifar, projection shortcuts."""
    model_args = dict(family="plainnet", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut_type="conv")
    return _create("cifar_plainnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet20(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-20: He et al. 2015's 6n+2 net with n = 3, zero-padding shortcuts."""
    model_args = dict(family="plainnet", widths=(16, 32, 64), depths=(3, 3, 3), shortcut_type="pad")
    return _create("cifar_plainnet20", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet32(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-32: He et al. 2015's 6n+2 net with n = 5, zero-padding shortcuts."""
    model_args = dict(family="plainnet", widths=(16, 32, 64), depths=(5, 5, 5), shortcut_type="pad")
    return _create("cifar_plainnet32", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet44(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-44: He et al. 2015's 6n+2 net with n = 7, zero-padding shortcuts."""
    model_args = dict(family="plainnet", widths=(16, 32, 64), depths=(7, 7, 7), shortcut_type="pad")
    return _create("cifar_plainnet44", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet56(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-56: He et al. 2015's 6n+2 net with n = 9, zero-padding shortcuts."""
    model_args = dict(family="plainnet", widths=(16, 32, 64), depths=(9, 9, 9), shortcut_type="pad")
    return _create("cifar_plainnet56", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_plainnet110(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR Plain-110: He et al. 2015's 6n+2 net with n = 18, zero-padding shortcuts."""
    model_args = dict(family="plainnet", widths=(16, 32, 64), depths=(18, 18, 18), shortcut_type="pad")
    return _create("cifar_plainnet110", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet18(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 18: the 3x3-stem 18-layer net of pytorch-cifar, projection shortcuts."""
    model_args = dict(family="gradnet", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut_type="conv")
    return _create("cifar_gradnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet20(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 20: He et al. 2015's 6n+2 net with n = 3, zero-padding shortcuts."""
    model_args = dict(family="gradnet", widths=(16, 32, 64), depths=(3, 3, 3), shortcut_type="pad")
    return _create("cifar_gradnet20", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet32(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 32: He et al. 2015's 6n+2 net with n = 5, zero-padding shortcuts."""
    model_args = dict(family="gradnet", widths=(16, 32, 64), depths=(5, 5, 5), shortcut_type="pad")
    return _create("cifar_gradnet32", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet44(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 44: He et al. 2015's 6n+2 net with n = 7, zero-padding shortcuts."""
    model_args = dict(family="gradnet", widths=(16, 32, 64), depths=(7, 7, 7), shortcut_type="pad")
    return _create("cifar_gradnet44", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet56(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 56: He et al. 2015's 6n+2 net with n = 9, zero-padding shortcuts."""
    model_args = dict(family="gradnet", widths=(16, 32, 64), depths=(9, 9, 9), shortcut_type="pad")
    return _create("cifar_gradnet56", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_gradnet110(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR gradient-only shortcut net 110: He et al. 2015's 6n+2 net with n = 18, zero-padding shortcuts."""
    model_args = dict(family="gradnet", widths=(16, 32, 64), depths=(18, 18, 18), shortcut_type="pad")
    return _create("cifar_gradnet110", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet18(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-18 with act(F(x)) + s(x): the 3x3-stem 18-layer net of pytorch-cifar, projection shortcuts."""
    model_args = dict(family="actresnet", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut_type="conv")
    return _create("cifar_actresnet18", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet20(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-20 with act(F(x)) + s(x): He et al. 2015's 6n+2 net with n = 3, zero-padding shortcuts."""
    model_args = dict(family="actresnet", widths=(16, 32, 64), depths=(3, 3, 3), shortcut_type="pad")
    return _create("cifar_actresnet20", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet32(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-32 with act(F(x)) + s(x): He et al. 2015's 6n+2 net with n = 5, zero-padding shortcuts."""
    model_args = dict(family="actresnet", widths=(16, 32, 64), depths=(5, 5, 5), shortcut_type="pad")
    return _create("cifar_actresnet32", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet44(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-44 with act(F(x)) + s(x): He et al. 2015's 6n+2 net with n = 7, zero-padding shortcuts."""
    model_args = dict(family="actresnet", widths=(16, 32, 64), depths=(7, 7, 7), shortcut_type="pad")
    return _create("cifar_actresnet44", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet56(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-56 with act(F(x)) + s(x): He et al. 2015's 6n+2 net with n = 9, zero-padding shortcuts."""
    model_args = dict(family="actresnet", widths=(16, 32, 64), depths=(9, 9, 9), shortcut_type="pad")
    return _create("cifar_actresnet56", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def cifar_actresnet110(pretrained: bool = False, **kwargs: Any) -> CifarShortcutNet:
    """CIFAR ResNet-110 with act(F(x)) + s(x): He et al. 2015's 6n+2 net with n = 18, zero-padding shortcuts."""
    model_args = dict(family="actresnet", widths=(16, 32, 64), depths=(18, 18, 18), shortcut_type="pad")
    return _create("cifar_actresnet110", pretrained, **dict(model_args, **kwargs))


@hookimpl
def dcanets_register_models() -> List[Callable[..., CifarShortcutNet]]:
    return list(MODELS)
