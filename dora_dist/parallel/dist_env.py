"""DistEnv lives in dora_dist/dist_env.py (a leaf: torch only), so models/, data/, checkpoint/ and health can type
their `env` parameters without importing parallel/; this name stays for the engines and older imports."""

from dora_dist.dist_env import DistEnv

__all__ = ["DistEnv"]
