"""The batch arithmetic of a job, resolved once from the config, the world size and the data set size.

`training.global_batch_size` (when set) fixes the accumulation steps for a given world size; `training.epochs`
(when `max_steps` is 0) fixes the step count for a given data set. Both are derived here, in one read-only object
that the trainer, the sampler and the engines (the LR schedule, DeepSpeed's JSON) all read; the config itself is
never rewritten, so the config.yaml a run saves is the one the user gave.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dora_dist.errors import ConfigError


@dataclass(frozen=True)
class Batching:
    micro_batch_size: int
    grad_accum: int
    world_size: int
    max_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @classmethod
    def resolve(cls, training, world_size: int, n_samples: int | None = None) -> Batching:
        """From the `training` section. n_samples is needed only when the length is given in epochs."""
        micro, accum = int(training.micro_batch_size), cls.accumulation(training, world_size)
        steps = int(training.max_steps)
        if not steps:
            if n_samples is None:
                raise ValueError("training.max_steps=0 (length in epochs) needs the data set size to resolve")
            steps = max(1, int(training.epochs * n_samples // (micro * accum * world_size)))
        return cls(micro, accum, world_size, steps)

    @staticmethod
    def accumulation(training, world_size: int) -> int:
        """Micro-steps per optimizer step: from global_batch_size when it is set, else training.grad_accum."""
        if not training.global_batch_size:
            return int(training.grad_accum)
        per_step = int(training.micro_batch_size) * world_size
        if training.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={training.global_batch_size} is not a multiple of "
                f"training.micro_batch_size × world size = {training.micro_batch_size} × {world_size}"
                f" = {per_step}: set global_batch_size to a multiple of {per_step} or change "
                "micro_batch_size / the number of processes"
            )
        return training.global_batch_size // per_step

    def describe(self) -> str:
        return (
            f"global_batch={self.global_batch_size} (micro {self.micro_batch_size} × accum {self.grad_accum} × "
            f"world {self.world_size}) steps={self.max_steps}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "global_batch_size": self.global_batch_size}
