#!/usr/bin/env bash
# Several nodes with torchrun and a c10d rendezvous. Run this same command on every node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/multinode.sh --config configs/llama3.1-70b-fsdp2-2nodes.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/multinode.sh --config configs/llama3.1-70b-fsdp2-2nodes.yaml
#
# MASTER_ADDR is the host of the rendezvous (any node reachable by all; usually node 0). NPROC_PER_NODE defaults to
# the visible GPUs (2 on a CPU-only machine). RDZV_ID names the job (the same on every node). Checkpoints and the
# output directory must be on a filesystem all nodes share.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (rendezvous host)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; n = torch.cuda.device_count(); print(n if n else 2)')
fi
# Validate the config for the whole world first (one line and exit code 2 on a config error, before torchrun).
WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) LOCAL_WORLD_SIZE="${NPROC_PER_NODE}" python -m dora_dist.train --check "$@" || exit $?
exec torchrun \
  --nnodes "${NNODES}" \
  --node-rank "${NODE_RANK}" \
  --nproc-per-node "${NPROC_PER_NODE}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv-id "${RDZV_ID:-dora_dist}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m dora_dist.train "$@"
