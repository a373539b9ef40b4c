"""Checkpoints: directory layout, atomic writes, retention and resume (manager); content via the engine (DCP by
default, see dcp.py; a DeepSpeed engine writes its own format into the same directories)."""
from dora_dist.checkpoint.manager import CheckpointManager, checkpoint_info, find_latest

__all__ = ["CheckpointManager", "checkpoint_info", "find_latest"]
