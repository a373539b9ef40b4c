#!/usr/bin/env bash
# SLURM: srun starts one task per GPU (no torchrun in between, so every rank's exit status reaches this script);
# the tasks meet at the first node of the allocation.
#
#   sbatch launch/slurm.sh --config configs/llama3.1-70b-fsdp2-2nodes.yaml [key=value ...]
#   sbatch --nodes 1 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm.sh --config configs/llama3.1-8b-fsdp2-8gpu.yaml
#
# Preemption and time limits. SLURM sends SIGTERM when it preempts the job, and SIGUSR1 120 s before the time limit
# (--signal below). Every rank finishes its step, a checkpoint is written and the ranks exit with 75; this script
# then requeues the job (scontrol requeue) and the requeued job resumes from that checkpoint (checkpoint.resume=auto,
# the default). A job cancelled with scancel is not requeued (scancel signals this script too). Give the ranks time
# to save: a step plus a checkpoint must fit in the warning (--signal) or the cluster's preemption GraceTime.
#SBATCH --job-name=dora_dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=dora_dist-%j.out
set -uo pipefail
REQUEUE_EXIT_CODE=75       # dora_dist.preemption.REQUEUE_EXIT_CODE
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Validate the config for the whole world first: a config error is one line and exit code 2, before any task starts.
WORLD_SIZE="${SLURM_NTASKS:-1}" python -m dora_dist.train --check "$@" || exit $?

cancelled=0
trap 'cancelled=1' TERM    # this script is signalled by scancel (and by preemption, which requeues by itself)

# One task per rank: RANK/LOCAL_RANK/WORLD_SIZE from SLURM's own variables.
srun --kill-on-bad-exit=1 bash -c '
  export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
  export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE%%(*}"
  exec python -m dora_dist.train "$@"' dora_dist "$@" &
srun_pid=$!
while true; do               # wait again when a trapped signal interrupts the wait
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $rc -eq $REQUEUE_EXIT_CODE && $cancelled -eq 0 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "[dora_dist] stopped for preemption or the time limit after a checkpoint: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$rc"
