"""Image data for the engine: sources, timm's layout, the decode cache, cached and stream modes.

The engine gets its loaders from one call, :func:`build_loaders` (``data_mode`` auto, cached or
stream; :mod:`.loaders`). Sources (``data=``):

- ``"digits"``: ``sklearn.datasets.load_digits`` (1,797 images, 8x8, 1 channel, 10 classes),
  the embedded default: real data that ships with a dependency.
- ``"synthetic"`` or ``"synthetic:N"``: a seeded generated 3x32x32, 10-class set for tests.
- an image-folder directory (``<class>/<file>``, any depth above) or a ``.tar`` of one, read
  through timm's readers; a root with ``train/`` and ``val/`` uses them as the splits (:mod:`.layout`).
- torchvision-format CIFAR-10 (``cifar-10-batches-py``), CIFAR-100 (``cifar-100-python``) or
  MNIST (``MNIST/raw/train-images-idx3-ubyte[.gz]``) directories (the training split).

Modules: :mod:`.sources` (``ImageData``, in-memory sources), :mod:`.layout` (timm's readers and
layout), :mod:`.decode` (one image, size checks), :mod:`.cache` (the decode cache's key and
checksum), :mod:`.cached` (decode-once sets, splits), :mod:`.batches` (cached mode's batches),
:mod:`.transforms` (timm's per-image transforms), :mod:`.stream` (stream mode), :mod:`.loaders`.
"""
from dcanets.engine.data.batches import GPU_RESIDENT_BYTES, BatchLoader, channel_stats, normalized, random_crop_flip
from dcanets.engine.data.cache import CACHE_VERSION, cache_dir
from dcanets.engine.data.cached import forget_decoded, load, load_split, source_size, split_indices
from dcanets.engine.data.layout import DataWarning, check_path
from dcanets.engine.data.loaders import Loaders, build_loaders, held_out
from dcanets.engine.data.sources import (
    ImageData,
    load_digits_data,
    synthetic,
    write_image_folder,
    write_image_tar,
    write_jpeg_folder,
)
from dcanets.engine.data.stream import EpochSampler, StreamDataset, StreamLoader

__all__ = ["CACHE_VERSION", "GPU_RESIDENT_BYTES", "BatchLoader", "DataWarning", "EpochSampler", "ImageData", "Loaders",
           "StreamDataset", "StreamLoader", "build_loaders", "cache_dir", "channel_stats", "check_path",
           "forget_decoded", "held_out", "load", "load_digits_data", "load_split", "normalized", "random_crop_flip",
           "source_size", "split_indices", "synthetic", "write_image_folder", "write_image_tar",
           "write_jpeg_folder"]
