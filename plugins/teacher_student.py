"""Students of paper 001's teacher–student problem as timm models, for training on samples.

``h(Z) = sum_j a_j relu(Z_j^T u / ||u||)`` over ``k`` non-overlapping patches of size ``p`` of a
flat input of length ``k * p``, with ``u = 1/sqrt(p) + w`` (the skip-layer prior, "ResNet"
student, ``w`` initialized at 0) or ``u = w`` (the plain CNN student, ``w`` random). The
normalization ``u / ||u||`` is paper 001's population batch norm.

The population-loss maths, normalized GD and the success-rate sweep live in
``dcanets.papers.p001_teacher_student``; these modules are the same students for SGD on sampled ``Z``.

``timm.create_model("teacher_student_resnet", num_patches=16, patch_size=8)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs

from dcanets.builder import Entrypoints, build, cfg
from dcanets.hookspecs import hookimpl


class NonOverlappingStudent(nn.Module):
    """Two-layer non-overlapping CNN student; ``skip_prior`` adds the fixed ``1/sqrt(p)`` shortcut."""

    shortcut: torch.Tensor  # a buffer: the fixed prior, not trained

    def __init__(self, num_patches: int = 16, patch_size: int = 8, skip_prior: bool = True,
                 num_classes: int = 1, in_chans: int = 1, **kwargs: Any) -> None:
        super().__init__()
        self.num_patches, self.patch_size, self.skip_prior = num_patches, patch_size, skip_prior
        self.num_classes = num_classes
        self.register_buffer("shortcut",
                             torch.full((patch_size,), (1.0 / math.sqrt(patch_size)) if skip_prior else 0.0))
        w0 = torch.zeros(patch_size) if skip_prior else torch.randn(patch_size) / math.sqrt(patch_size)
        self.w = nn.Parameter(w0)  # paper 001: w_0 = 0 with the prior
        self.a = nn.Parameter(torch.randn(num_patches) / math.sqrt(num_patches))

    def filter(self) -> torch.Tensor:
        """The unit filter ``(1/sqrt(p) + w) / ||1/sqrt(p) + w||``."""
        u = self.shortcut + self.w
        return u / u.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], self.num_patches, self.patch_size)
        return (torch.relu(z @ self.filter()) * self.a).sum(-1, keepdim=True)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> NonOverlappingStudent:
    return build(NonOverlappingStudent, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    name: cfg(num_classes=1, input_size=(1, 16, 8), pool_size=None, mean=(0.0,), std=(1.0,),
              first_conv="", classifier="a") for name in ("teacher_student_resnet", "teacher_student_cnn")})

MODELS = Entrypoints()


@MODELS.add
def teacher_student_resnet(pretrained: bool = False, **kwargs: Any) -> NonOverlappingStudent:
    """Paper 001 student with the skip-layer prior 1/sqrt(p) + w."""
    model_args = dict(skip_prior=True)
    return _create("teacher_student_resnet", pretrained, **dict(model_args, **kwargs))


@MODELS.add
def teacher_student_cnn(pretrained: bool = False, **kwargs: Any) -> NonOverlappingStudent:
    """Paper 001 plain non-overlapping CNN student (no prior)."""
    model_args = dict(skip_prior=False)
    return _create("teacher_student_cnn", pretrained, **dict(model_args, **kwargs))


@hookimpl
def dcanets_register_models() -> List[Callable[..., NonOverlappingStudent]]:
    return list(MODELS)
