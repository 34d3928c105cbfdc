"""Multi-branch MLPs of paper 002, §3.2 (Zhang et al.): ``f(x) = (1/I) sum_i f_i(x)`` (eq. 16).

``I`` parallel sub-networks, each an MLP of ``depth`` hidden layers, share the input and average
their outputs. ``total_width`` is fixed and split evenly, so growing ``num_branches`` changes the
architecture's non-convexity, not its size: with ``num_branches = total_width`` and ``depth = 1``
every branch is a single hidden unit and the net is an ordinary one-hidden-layer MLP scaled by
``1/I`` (the case ``H_i = 1, d_{H_i} = 1`` of the paper). Paper 002's bound: the normalized duality
gap is at most ``2 / I``.

The branches are one batched tensor per layer (shape ``(I, fan_in, fan_out)``, applied with
``einsum``), not a Python loop, so ``num_branches = 64`` costs the same as 1.

``timm.create_model("multibranch_mlp_1h", num_branches=8, total_width=64)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl


class BranchLinear(nn.Module):
    """``I`` independent linear maps applied to ``I`` inputs at once: (I, B, n) -> (I, B, m)."""

    def __init__(self, branches: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per branch
        self.weight = nn.Parameter(torch.empty(branches, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(branches, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # shared input: (B, n) for every branch
            return torch.einsum("bn,inm->ibm", x, self.weight) + self.bias
        return torch.einsum("ibn,inm->ibm", x, self.weight) + self.bias


class MultiBranchMLP(nn.Module):
    """``(1/I) sum_i f_i(x)`` with ``f_i`` an MLP of ``depth`` hidden layers of width ``total_width / I``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8,
                 num_branches: int = 1, total_width: int = 64, depth: int = 1,
                 drop_rate: float = 0.0, **kwargs: Any) -> None:
        super().__init__()
        if num_branches < 1 or total_width % num_branches:
            raise ValueError(f"num_branches must be >= 1 and divide total_width={total_width}; "
                             f"got num_branches={num_branches}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.num_classes, self.num_branches, self.total_width = num_classes, num_branches, total_width
        width = total_width // num_branches
        self.in_features = in_chans * img_size * img_size
        dims = [self.in_features] + [width] * depth
        self.hidden = nn.ModuleList(BranchLinear(num_branches, a, b) for a, b in zip(dims, dims[1:]))
        self.act = nn.ReLU()
        self.head = BranchLinear(num_branches, width, num_classes)
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-branch hidden features, shape (I, B, width)."""
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.act(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)).mean(0)  # paper 002, eq. 16: (1/I) sum_i f_i

    def get_classifier(self) -> nn.Module:
        return self.head


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MultiBranchMLP:
    return build(MultiBranchMLP, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    name: cfg(num_classes=10, input_size=(1, 8, 8), pool_size=None, mean=(0.0,), std=(1.0,),
              first_conv="", classifier="head") for name in ("multibranch_mlp_1h", "multibranch_mlp_3h")})

MODELS = Entrypoints()


@MODELS.add
def multibranch_mlp_1h(pretrained: bool = False, **kwargs: Any) -> MultiBranchMLP:
    """Multi-branch MLP, one hidden layer per branch (paper 002, Fig. 2 top rows)."""
    model_args = dict(depth=1)
    return _create("multibranch_mlp_1h", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def multibranch_mlp_3h(pretrained: bool = False, **kwargs: Any) -> MultiBranchMLP:
    """Multi-branch MLP, three hidden layers per branch (paper 002, Fig. 2 bottom row)."""
    model_args = dict(depth=3)
    return _create("multibranch_mlp_3h", pretrained, **dict(model_args, **kwargs))


@hookimpl
def dcanets_register_models() -> List[Callable[..., MultiBranchMLP]]:
    return list(MODELS)
