#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine N gloo processes).
#
#   launch/torchrun.sh [--config FILE.yaml] [key=value ...]
#   NPROC_PER_NODE=2 launch/torchrun.sh --config configs/quickstart.yaml
#
# NPROC_PER_NODE defaults to the number of visible GPUs, or 2 without GPUs. MAX_RESTARTS=N lets torchrun restart
# the workers up to N times after a rank dies; they resume from the latest complete checkpoint (checkpoint.resume=auto).
set -euo pipefail
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; n = torch.cuda.device_count(); print(n if n else 2)')
fi
# Validate the config for this world first: a config error is one line and exit code 2, not a failure of torchrun's
# agent (with its own traceback) after every rank has started.
WORLD_SIZE="${NPROC_PER_NODE}" python -m dora_dist.train --check "$@" || exit $?
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE}" --max-restarts "${MAX_RESTARTS:-0}" \
  -m dora_dist.train "$@"
