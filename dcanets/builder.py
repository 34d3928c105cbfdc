"""What every dcanets model family shares when it builds through timm."""
from __future__ import annotations

from typing import Any, Callable, Dict, Type, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg

F = TypeVar("F", bound=Callable[..., nn.Module])
M = TypeVar("M", bound=nn.Module)


def cfg(**kwargs: Any) -> Dict[str, Any]:
    """A default cfg without weights: no url and no hub id, so nothing is ever downloaded."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def build(model_cls: Type[M], variant: str, pretrained: bool, **kwargs: Any) -> M:
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


class Entrypoints(list):
    """A plugin module's model builders, in the order they are defined.

    ``@MODELS.add`` above a builder plays the part of timm's ``@register_model`` without
    registering anything: the plugin's ``dcanets_register_models`` hook returns the list and
    dcanets registers it, after checking each name against timm and the other plugins. A builder
    cannot be defined and then forgotten in a hand-kept list.
    """

    def add(self, fn: F) -> F:
        self.append(fn)
        return fn
