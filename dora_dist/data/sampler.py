"""Deterministic global-batch sampler, sharded across ranks and resumable mid-epoch.

The sample stream is the concatenation of per-epoch permutations (seeded by seed and epoch). Optimizer step s uses
stream positions [s·G, (s+1)·G), G = micro_batch × grad_accum × world. Within a step, micro-step j of rank r takes
positions s·G + (j·world + r)·micro + [0, micro). So the samples of every optimizer step depend only on (seed, G),
not on how G is split into processes and accumulation steps: 1 process × 4 accumulation and 2 processes × 2
accumulation train on the same samples, step by step. The state is just the next step (no hidden iterator state).
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, n_samples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if n_samples <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = (
            n_samples,
            micro_batch,
            grad_accum,
            world_size,
            rank,
            seed,
        )
        self.step = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> float:
        return self.n / self.global_batch

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            perm = rng.permutation(self.n)
            self._perm_cache = {epoch: perm}  # keep one epoch cached
        return perm

    def _positions(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            out.append(int(self._perm(p // self.n)[p % self.n]))
        return out

    def global_indices(self, step: int) -> list[int]:
        """All sample indices of optimizer step `step` (every rank can compute them: used for the token count)."""
        return self._positions(step * self.global_batch, self.global_batch)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (grad_accum lists of micro_batch indices) for optimizer step `step`."""
        base = step * self.global_batch
        return [
            self._positions(base + (j * self.world + self.rank) * self.micro, self.micro) for j in range(self.accum)
        ]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n

    # --- resumption ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch, "n_samples": self.n}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("global_batch", self.global_batch), ("n_samples", self.n)):
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume the data position: checkpoint has {key}={state.get(key)}, this run "
                    f"has {mine} (keep training.seed, the global batch size and the data the same)"
                )
        self.step = int(state["step"])
