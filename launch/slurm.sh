#!/usr/bin/env bash
# SLURM: srun starts one task per GPU (no torchrun in between, so every rank's exit status reaches this script);
# the tasks meet at the first node of the allocation.
#
#   sbatch launch/slurm.sh --config configs/llama3.1-70b-fsdp2-2nodes.yaml [key=value ...]
#   sbatch --nodes 1 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm.sh --config configs/llama3.1-8b-fsdp2-8gpu.yaml
#
# Time limits and preemption. SLURM sends SIGUSR1 120 s before the time limit (--signal below): every rank finishes
# its step, a checkpoint is written, the ranks exit with 75 and rank 0 writes $DORA_DIST_REQUEUE_FILE; this script
# then requeues the job (scontrol requeue) and the requeued job resumes from that checkpoint (checkpoint.resume=auto,
# the default). A step plus a checkpoint must fit in those 120 s: raise --signal for big models. A job cancelled
# with scancel is not requeued (scancel signals this script too). On preemption SLURM sends SIGTERM, which the ranks
# treat the same way if srun lets them finish (within the partition's GraceTime); a preempted job is requeued by
# SLURM itself (--requeue) and resumes from its latest checkpoint either way.
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
export DORA_DIST_REQUEUE_FILE="${DORA_DIST_REQUEUE_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.dora_dist_requeue_${SLURM_JOB_ID:-local}}"
rm -f "$DORA_DIST_REQUEUE_FILE"

# Validate the config for the whole world first: a config error is one line and exit code 2, before any task starts.
PER_NODE="${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}"
WORLD_SIZE="${SLURM_NTASKS:-1}" LOCAL_WORLD_SIZE="${PER_NODE%%(*}" python -m dora_dist.train --check "$@" || exit $?

cancelled=0
trap 'cancelled=1' TERM    # this script is signalled by scancel (and by preemption, which requeues by itself)

# One task per rank: RANK/LOCAL_RANK/WORLD_SIZE from SLURM's own variables.
srun --kill-on-bad-exit=1 bash -c '
  export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
  export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE%%(*}"
  exec python -m dora_dist.train "$@"' dora_dist "$@" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do   # a trapped signal interrupts `wait`: wait again
  wait "$srun_pid"
done
wait "$srun_pid"; rc=$?

# The ranks' own word (the marker) decides, not srun's status: --kill-on-bad-exit can turn 75 into 143.
if [[ ( $rc -eq $REQUEUE_EXIT_CODE || -f "$DORA_DIST_REQUEUE_FILE" ) && $cancelled -eq 0 && -n "${SLURM_JOB_ID:-}" ]]; then
  rm -f "$DORA_DIST_REQUEUE_FILE"
  echo "[dora_dist] stopped for the time limit or preemption after a checkpoint: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
rm -f "$DORA_DIST_REQUEUE_FILE"
exit "$rc"
