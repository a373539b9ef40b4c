"""Streaming merge of an adapter into its base checkpoint (`dora-dist merge`), one tensor at a time."""

from dora_dist.merge.run import MergeError, check_out_dir, merge

__all__ = ["MergeError", "check_out_dir", "merge"]
