"""One image file's bytes to a ``uint8 [C, H, W]`` tensor, with the checks every mode shares.

torchvision's decoders (``torchvision.io.decode_image``) are the fast path, 1.5-3x PIL's on the
JPEGs and PNGs of image folders; PIL reads the formats they do not. Before any pixel is decoded
the header's size is checked: an image over PIL's own decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 megapixels unless you change it) or one whose shorter side is
below ``min_side`` (a 1x1 stray among photos) is a :class:`BadImage`, which the caller skips with
the image's path named, instead of letting it reshape or exhaust the set.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


class BadImage(ValueError):
    """An image that cannot be used: not decodable, or outside the size limits. The message is the reason."""


class OutOfRange(BadImage):
    """An image of a size the set cannot use (a 1x1 stray, a decompression bomb): skipped, never fatal."""


def _over_limit(pixels: int) -> OutOfRange:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return OutOfRange(f"{pixels} pixels, over the decode limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")


def header(blob: bytes) -> Tuple[int, int, bool]:
    """(height, width, grayscale) from the file's header, without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    if not blob:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as exc:  # PIL refuses twice its limit already in the header
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _over_limit(int(found.group(1)) if found else 0) from None
    except UnidentifiedImageError:  # its message names a BytesIO, not the file
        raise BadImage("not an image format PIL or torchvision can read, or a damaged file") from None
    except Exception as exc:  # PIL raises many kinds; the file is what matters
        raise BadImage(f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
    w, h = im.size
    return h, w, im.mode in ("1", "L", "I", "I;16", "LA")


def check_size(h: int, w: int, min_side: int) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and h * w > limit:
        raise OutOfRange(f"{w}x{h} pixels, over the decode limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    if min(h, w) < min_side:
        raise OutOfRange(f"{w}x{h} pixels, far smaller than the set's images (shorter side below {min_side})")


def decode(blob: bytes, gray: bool, min_side: int = 1) -> torch.Tensor:
    """One image file -> ``uint8 [C, H, W]`` (1 channel if ``gray``, else 3), after the size checks."""
    h, w, _ = header(blob)
    check_size(h, w, min_side)
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec's: still the fastest
            warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=mode)
    except RuntimeError:  # formats torchvision cannot read (bmp, tiff, ...): PIL
        pass
    from PIL import Image

    try:
        arr = np.asarray(Image.open(io.BytesIO(blob)).convert("L" if gray else "RGB"))
    except Exception as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
    return torch.from_numpy(arr[None].copy() if gray else arr.transpose(2, 0, 1).copy())


def fit(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``img`` [C, H, W] at ``size``: the shorter side resized to the target's (aspect kept, antialiased),
    then the centre cropped, as timm's evaluation transform does at ``crop_pct=1``; unchanged if it fits."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    from torchvision.transforms.v2 import functional as F

    th, tw = int(size[0]), int(size[1])
    h, w = int(img.shape[1]), int(img.shape[2])
    scale = max(th / h, tw / w)
    resized = F.resize(img, [max(th, round(h * scale)), max(tw, round(w * scale))], antialias=True)
    return F.center_crop(resized, [th, tw])


def most_common(sizes: Sequence[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """The most common size, ties going to the one seen first (file order)."""
    counts: dict = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    return max(counts, key=lambda s: counts[s]) if counts else None
