"""Quantized base-weight formats DoRA can sit on (bitsandbytes 4-bit / 8-bit, FSDP2-shardable 4-bit).

Importing this package registers their weight sources with dora_dist.nn.weight_source (bitsandbytes itself is
imported only when a 4-bit or 8-bit layer is used).
"""

from dora_dist.quant import bnb as _bnb_sources  # noqa: F401  (registers Linear4bit, Linear8bitLt)
from dora_dist.quant import sharded4bit_source as _sharded_sources  # noqa: F401  (registers ShardedLinear4bit)
