"""Checkpoints: directory layout, atomic writes, retention and resume (manager; the directory protocol and write
errors: atomic.py); content via the engine (DCP by default, see dcp.py; a DeepSpeed engine writes its own format
into the same directories)."""

from dora_dist.checkpoint.atomic import CheckpointWriteError
from dora_dist.checkpoint.manager import CheckpointManager, DamagedCheckpointError, checkpoint_info, find_latest

__all__ = ["CheckpointManager", "CheckpointWriteError", "DamagedCheckpointError", "checkpoint_info", "find_latest"]
