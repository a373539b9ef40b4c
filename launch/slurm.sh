#!/usr/bin/env bash
# SLURM: one torchrun per node (srun), c10d rendezvous on the first node of the allocation.
#
#   sbatch launch/slurm.sh --config configs/llama3.1-70b-fsdp2-2nodes.yaml [key=value ...]
#   sbatch --nodes 1 --gpus-per-node 8 launch/slurm.sh --config configs/llama3.1-8b-fsdp2-8gpu.yaml
#
# checkpoint.resume=auto (the default) makes a requeued job continue from its latest checkpoint.
#SBATCH --job-name=dora_dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=dora_dist-%j.out
set -euo pipefail
NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-$(python -c 'import torch; n = torch.cuda.device_count(); print(n if n else 2)')}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Validate the config for the whole world first (one line and exit code 2 on a config error, before srun/torchrun).
WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) python -m dora_dist.train --check "$@" || exit $?
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  torchrun \
    --nnodes "${NNODES}" \
    --nproc-per-node "${NPROC_PER_NODE}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${SLURM_JOB_ID:-dora_dist}" \
    -m dora_dist.train "$@"
