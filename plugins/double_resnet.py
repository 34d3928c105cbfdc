"""Double residual networks (paper 003, section 3.1 and 5): each output a difference of convex nets.

Output k is ``r_k(x) - s_k(x) + d_k`` with r_k, s_k convex residual networks (eq. 7a-7c,
``dcanets.papers.p003_convex.ConvexResNets``) on a shared feature vector; d_k is the difference of the two
nets' own offsets d. All 2K nets run as one batched einsum per layer.

Registered names (timm-style, ``timm.create_model(name, num_classes=..., in_chans=...)``):

* ``double_resnet_mnist``: the paper's MNIST model (section 5): one conv layer of 64 filters
  6x6, max over non-overlapping 4x4 windows, 10 pairs of 3-layer residual nets; no BN, no dropout.
* ``double_resnet_cifar``: the same layout on 3x32x32 inputs.
* ``double_resnet_flat``: no conv stem; the flattened input is the feature vector (default
  1x8x8, sklearn's digits); ``img_size``/``in_chans`` set the number of input features.

Every architecture argument is a ``create_model`` kwarg: ``layers``, ``hidden`` (m_i),
``stem_chs`` (0 = no stem), ``stem_kernel``, ``stem_pool``, ``bias_range``, ``w_init``, and
``batched=False`` (one Python loop over the nets, for the speed comparison only).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl
from dcanets.papers.p003_convex import ConvexResNets


class DoubleResNet(nn.Module):
    """Optional conv stem -> flatten -> K pairs of convex residual nets -> r_k - s_k."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: Sequence[int] = (28, 28),
                 stem_chs: int = 64, stem_kernel: int = 6, stem_pool: int = 4, layers: int = 3,
                 hidden: int = 32, bias_range: Tuple[float, float] = (0.0, 0.5), w_init: float = 0.1,
                 batched: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (one pair of nets per output), got {num_classes}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, tuple(img_size)
        self.batched = batched
        self.head_args: Dict[str, Any] = dict(layers=layers, hidden=hidden, bias_range=tuple(bias_range), w_init=w_init)
        if stem_chs:
            # section 5: 64 filters 6x6 ("edges"), then max over non-overlapping 4x4 windows
            self.stem: nn.Module = nn.Sequential(nn.Conv2d(in_chans, stem_chs, stem_kernel), nn.MaxPool2d(stem_pool))
            side = [(s - stem_kernel + 1) // stem_pool for s in self.img_size]
            self.num_features = stem_chs * side[0] * side[1]
            if min(side) < 1:
                raise ValueError(f"img_size {self.img_size} too small for a {stem_kernel}x{stem_kernel} "
                                 f"conv and {stem_pool}x{stem_pool} max-pool; use stem_chs=0")
        else:
            self.stem = nn.Identity()
            self.num_features = in_chans * int(torch.tensor(self.img_size).prod())
        self.head = ConvexResNets(self.num_features, 2 * num_classes, **self.head_args)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x).flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        out = self.head(x) if self.batched else self.head.forward_loop(x)
        k = self.num_classes
        return out[:, :k] - out[:, k:]  # f_k = r_k - s_k (+ d_k = d_{r_k} - d_{s_k})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """New, freshly initialised pairs of nets for ``num_classes`` outputs (timm's contract)."""
        self.num_classes = num_classes
        self.head = ConvexResNets(self.num_features, 2 * num_classes, **self.head_args)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DoubleResNet:
    return build(DoubleResNet, variant, pretrained, **kwargs)


MNIST_NORM = dict(mean=(0.1307,), std=(0.3081,))
CIFAR_NORM = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
_common = dict(num_classes=10, pool_size=None, crop_pct=1.0, fixed_input_size=True, classifier="head")
default_cfgs = generate_default_cfgs({
    "double_resnet_mnist": cfg(**_common, input_size=(1, 28, 28), first_conv="stem.0", **MNIST_NORM),
    "double_resnet_cifar": cfg(**_common, input_size=(3, 32, 32), first_conv="stem.0", **CIFAR_NORM),
    "double_resnet_flat": cfg(**_common, input_size=(1, 8, 8), first_conv="", mean=(0.0,), std=(1.0,)),
})

MODELS = Entrypoints()


@MODELS.add
def double_resnet_mnist(pretrained: bool = False, **kwargs: Any) -> DoubleResNet:
    """Paper 003's MNIST model: conv 64x6x6, 4x4 max-pool, 10 pairs of 3-layer convex ResNets."""
    model_args = dict(stem_chs=64, stem_kernel=6, stem_pool=4, layers=3)
    return _create("double_resnet_mnist", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def double_resnet_cifar(pretrained: bool = False, **kwargs: Any) -> DoubleResNet:
    """The MNIST layout of paper 003 on 3x32x32 inputs."""
    model_args = dict(stem_chs=64, stem_kernel=6, stem_pool=4, layers=3)
    return _create("double_resnet_cifar", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def double_resnet_flat(pretrained: bool = False, **kwargs: Any) -> DoubleResNet:
    """Pairs of convex ResNets on the flattened input (no conv stem); default 1x8x8."""
    model_args = dict(stem_chs=0, layers=3)
    return _create("double_resnet_flat", pretrained, **dict(model_args, **kwargs))


@hookimpl
def dcanets_register_models() -> List[Callable[..., DoubleResNet]]:
    return list(MODELS)
