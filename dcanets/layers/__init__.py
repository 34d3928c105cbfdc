"""Building blocks of dcanets' model families (as timm keeps its blocks in ``timm.layers``): the
plugins assemble models from them and the analysis reads models through them."""
from dcanets.layers.shortcut import (
    FAMILY,
    BlockArgs,
    ShortcutBlock,
    ShortcutMixin,
    block_forward,
    family_args,
    merge,
    merging_as,
    shortcut_blocks,
    unfused,
)

__all__ = ["FAMILY", "BlockArgs", "ShortcutBlock", "ShortcutMixin", "block_forward", "family_args", "merge",
           "merging_as", "shortcut_blocks", "unfused"]
