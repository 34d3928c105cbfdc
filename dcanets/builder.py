"""What every dcanets model family shares when it builds through timm."""
from __future__ import annotations

from typing import Any, Callable, Dict, Type

import torch.nn as nn
from timm.models import build_model_with_cfg


def cfg(**kwargs: Any) -> Dict[str, Any]:
    """A default cfg without weights: no url and no hub id, so nothing is ever downloaded."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def build(model_cls: Type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` that refuses ``pretrained=True`` at once.

    timm would only log a warning and return random weights; a user asking for weights that do
    not exist should learn so before a training run, not after.
    """
    if pretrained:
        raise ValueError(
            f"no pretrained weights exist for '{variant}' (dcanets ships none); "
            "use pretrained=False, or load your own with timm.create_model(name, checkpoint_path=...)"
        )
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


def entrypoint(name: str, create: Callable[..., nn.Module], doc: str, **model_args: Any) -> Callable[..., nn.Module]:
    """A timm-style builder registered as ``name``: ``create(name, pretrained, **model_args, **kwargs)``.

    Families with many names (depth x shortcut type) declare them as a table and build their
    entry points here, instead of repeating one three-line function per name. The builder's
    ``__module__`` is the family's module, so timm finds that module's ``default_cfgs``.
    """
    def builder(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, pretrained, **dict(model_args, **kwargs))

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = create.__module__
    builder.__doc__ = doc
    return builder
