"""Stream mode's per-image transforms: timm's own recipe (``create_transform``), run on uint8 tensors.

The transforms are the ones ``timm.data.create_transform`` builds with ``use_prefetcher=True``,
as timm's ``train.py`` does: for training ``RandomResizedCropAndInterpolation`` (``scale``,
``ratio``, ``train_interpolation``) + horizontal flip (``hflip``), then RandAugment / AutoAugment /
AugMix (``aa``) or colour jitter (``color_jitter``); for evaluation a resize of the shorter side to
``img_size / crop_pct`` + centre crop. Normalization and random erasing (``reprob``, ``remode``,
``recount``) run on the whole batch on the device (timm's ``PrefetchLoader``).

Two pixel paths do the same steps (see docs/training.md for the measurements):

- ``tensor`` (the engine's): ``torchvision.io.decode_image`` to a uint8 tensor, and the crop and
  resizes through ``torchvision.transforms.v2``'s uint8 kernels; the crop's random parameters are
  drawn by timm's own ``RandomResizedCropAndInterpolation.get_params``, so the crop distribution is
  timm's. ``aa`` policies are PIL operations: the cropped 224-px tensor is handed to them as a PIL
  image and back.
- ``pil``: timm's ``ImageDataset`` path exactly: ``PIL.Image.open(...).convert("RGB")`` and timm's
  transforms on PIL images (for comparison, ``benchmarks/data_scale.py``).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

PATHS = ("tensor", "pil")


def data_config(model: str, input_size: Optional[Sequence[float]], img_size: Optional[int],
                crop_pct: Optional[float]) -> Dict[str, Any]:
    """timm's ``resolve_data_config``: input size, interpolation, mean/std, crop_pct and crop mode from
    the model's pretrained config, overridden by the run's ``input_size`` / ``img_size`` / ``crop_pct``."""
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(model) if timm.models.is_model(model) else None
    args: Dict[str, Any] = {"input_size": tuple(int(v) for v in input_size) if input_size else None,
                            "img_size": int(img_size) if img_size else None, "crop_pct": crop_pct}
    return resolve_data_config(args, pretrained_cfg=pretrained.to_dict() if pretrained is not None else None)


class _TensorRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` on a uint8 tensor: timm's parameter draw and
    interpolation choice, torchvision v2's uint8 resize kernel (about 2x the v1 path timm's class takes
    on tensors)."""

    def __init__(self, timm_crop: Any) -> None:
        self.crop = timm_crop

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        c = self.crop
        i, j, h, w = c.get_params(img, c.scale, c.ratio)
        mode = random.choice(c.interpolation) if isinstance(c.interpolation, (tuple, list)) else c.interpolation
        return F.resized_crop(img, i, j, h, w, list(c.size), interpolation=mode, antialias=True)


class _TensorResize:
    """torchvision v1 ``Resize`` (timm's evaluation resize) through the v2 uint8 kernel."""

    def __init__(self, resize: Any) -> None:
        self.resize = resize

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        size = self.resize.size
        return F.resize(img, [size] if isinstance(size, int) else list(size),
                        interpolation=self.resize.interpolation, max_size=self.resize.max_size, antialias=True)


class _ViaPil:
    """A PIL-only transform (timm's ``aa`` policies) applied to a uint8 tensor."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor, to_pil_image

        return pil_to_tensor(self.transform(to_pil_image(img)))


def _tensorized(steps: List[Any]) -> List[Any]:
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    out: List[Any] = []
    for t in steps:
        if isinstance(t, RandomResizedCropAndInterpolation):
            out.append(_TensorRandomResizedCrop(t))
        elif type(t) is T.Resize:
            out.append(_TensorResize(t))
        elif isinstance(t, (RandAugment, AutoAugment, AugMixAugment)):
            out.append(_ViaPil(t))
        else:  # flips, colour jitter, centre crop, MaybePILToTensor: torchvision/timm take tensors as they are
            out.append(t)
    return out


def build(dc: Dict[str, Any], training: bool, augment: bool, path: str = "tensor", scale: Any = None,
          ratio: Any = None, hflip: float = 0.5, color_jitter: float = 0.4, train_interpolation: str = "random",
          aa: Optional[str] = None) -> Callable[[Any], torch.Tensor]:
    """The per-image transform: decoded image (uint8 tensor for ``tensor``, PIL for ``pil``) -> uint8
    ``[C, H, W]`` at ``dc["input_size"]``."""
    from timm.data import create_transform
    from torchvision import transforms as T

    if aa and dc["input_size"][0] != 3:
        raise ValueError(f"aa='{aa}': timm's augmentation policies need RGB images (input_size[0]=3)")
    common = dict(input_size=dc["input_size"], mean=dc["mean"], std=dc["std"], use_prefetcher=True)
    try:
        if training and augment:
            steps = create_transform(is_training=True, scale=_pair(scale), ratio=_pair(ratio), hflip=hflip,
                                     color_jitter=color_jitter, auto_augment=aa or None,
                                     interpolation=train_interpolation, separate=True, **common)
            flat = [t for part in steps for t in part.transforms]
        else:
            tf = create_transform(is_training=training, no_aug=training, interpolation=dc["interpolation"],
                                  crop_pct=dc["crop_pct"], crop_mode=dc["crop_mode"], **common)
            flat = list(tf.transforms)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"timm cannot build the transform (aa={aa!r}, interpolation={train_interpolation!r}): "
                         f"{exc or type(exc).__name__}; see timm.data.create_transform for the accepted values"
                         ) from None
    return T.Compose(_tensorized(flat) if path == "tensor" else flat)


def _pair(value: Any) -> Optional[tuple]:
    return None if value is None else tuple(float(v) for v in value)
