"""What every dcanets model family shares when it builds through timm, and the record of the
models dcanets built.

Why the record: a DC decomposition needs the model its parameters belong to (its hooks go on the
model's blocks), and a training loop that is not dcanets' own (timm's ``train.py``, Lightning,
yours) has no place to say so. ``timm.create_model`` of a dcanets name builds through
:func:`build`, which remembers the model (weakly: recording keeps nothing alive), so that an
optimizer built on its parameters finds it (:func:`owning_model`) and hooks it at once.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Type, TypeVar

import torch
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
    return record(build_model_with_cfg(model_cls, variant, pretrained, **kwargs))


_BUILT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def record(model: M) -> M:
    """Remember that dcanets built ``model`` (weakly) and return it. :func:`build` does this; a
    plugin whose builder does not call it (e.g. one that calls timm's ``build_model_with_cfg``
    itself) calls ``record`` on what it returns, so DC decompositions find its models too."""
    _BUILT.add(model)
    return model


def owning_model(params: Iterable[torch.Tensor]) -> Optional[nn.Module]:
    """The model dcanets built that holds every one of ``params`` (the largest, when one built
    model holds another), or None: the parameters are not (all) those of a model dcanets built.

    Parameters are matched by identity against each recorded model's current parameters, so a
    classifier replaced after building (``reset_classifier``) still counts."""
    wanted = {id(p) for p in params}
    if not wanted:
        return None
    best: Optional[nn.Module] = None
    best_size = 0
    for model in list(_BUILT):
        held = {id(p) for p in model.parameters()}
        if wanted <= held and len(held) > best_size:
            best, best_size = model, len(held)
    return best


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
