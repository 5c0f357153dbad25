"""Attention and distributed packing plugins of fms-acceleration-accelerate.

* ``padding_free`` (section ``training.attention.padding_free``): batches flattened into one row of real tokens,
  attention that never crosses example boundaries (:mod:`.padding_free`, :mod:`.attention`, :mod:`.collate`).
* ``multipack`` (section ``training.dataloader.multipack``): token-budget batch sampling across ranks.
"""

from .config import PaddingFreeConfig
from .multipack import MultipackBatchSampler, example_lengths
from .multipack_plugin import MultipackAccelerationPlugin, MultipackConfig
from .padding_free import PaddingFreePlugin

__all__ = [
    "MultipackAccelerationPlugin",
    "MultipackBatchSampler",
    "MultipackConfig",
    "PaddingFreeConfig",
    "PaddingFreePlugin",
    "example_lengths",
]
