"""Quantized base-weight formats DoRA can sit on (bitsandbytes 4-bit / 8-bit, FSDP2-shardable 4-bit)."""
