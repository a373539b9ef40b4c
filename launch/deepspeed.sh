#!/usr/bin/env bash
# DoRA/QDoRA training under the DeepSpeed launcher (ZeRO-2 / ZeRO-3), on one node or many.
#
#   launch/deepspeed.sh [--config FILE.yaml] [key=value ...]
#
# One node (NUM_GPUS processes; on a CPU-only machine DeepSpeed's cpu accelerator runs NUM_GPUS processes on gloo):
#   NUM_GPUS=8 launch/deepspeed.sh --config configs/llama3.1-8b-zero3.yaml
#   NUM_GPUS=2 launch/deepspeed.sh --config configs/quickstart.yaml training.max_steps=20      # CPU smoke test
# Several nodes (ssh/pdsh from this node to every host of the hostfile; see launch/hostfile.example):
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/deepspeed.sh --config configs/llama3.1-70b-zero3-offload.yaml
# Several nodes without ssh between them: run the same command on every node with its NODE_RANK (0, 1, ...):
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 NODE_RANK=$SLURM_NODEID launch/deepspeed.sh --config ...
#
# Environment:
#   ENGINE       zero2 | zero3: force parallel.engine (default: the config's engine if it is zero2/zero3, else zero3)
#   NUM_GPUS     processes per node (default: all visible GPUs, or 2 without GPUs)
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" lines); enables the multi-node launch
#   MASTER_ADDR  address of the first host (multi-node; default: the first host of the hostfile)
#   MASTER_PORT  rendezvous port (default 29500)
#   LAUNCHER     DeepSpeed multi-node backend: pdsh (default), openmpi, mvapich, slurm, mpich, impi
#   NODE_RANK    with HOSTFILE: start only this node's processes (deepspeed --no_ssh); run once per node
#   DS_ARGS      extra arguments for the deepspeed launcher (e.g. "--include node1:0,1@node2:0,1")
# The DeepSpeed JSON is generated from the config (see dora_dist/parallel/zero_config.py); a user JSON can be added
# with parallel.deepspeed_config=FILE.json (its keys must not contradict the config).
set -euo pipefail

PYTHON=${PYTHON:-python}
if ! command -v deepspeed >/dev/null 2>&1; then
    echo "deepspeed.sh: the 'deepspeed' launcher is not installed (pip install 'dora_dist[deepspeed]')" >&2
    exit 2
fi

# Pick the engine: keep a zero2/zero3 engine chosen by the config (or the overrides), else use zero3.
CONFIG_ARGS=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config|-c) CONFIG_ARGS=(--config "$2"); shift 2 ;;
        --config=*) CONFIG_ARGS=(--config "${1#--config=}"); shift ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done
if [[ -z "${ENGINE:-}" ]]; then
    CONFIGURED=$("$PYTHON" - "${CONFIG_ARGS[@]}" "${OVERRIDES[@]}" <<'PY'
import sys
from dora_dist.config import load_config
args = sys.argv[1:]
path = None
if args[:1] == ["--config"]:
    path, args = args[1], args[2:]
try:
    print(load_config(path, args).parallel.engine)
except Exception:  # a bad config is reported by the --check below, as one line
    print("zero3")
PY
    )
    case "$CONFIGURED" in
        zero2|zero3) ENGINE=$CONFIGURED ;;
        *) ENGINE=zero3 ;;
    esac
fi
case "$ENGINE" in
    zero2|zero3) ;;
    *) echo "deepspeed.sh: ENGINE must be zero2 or zero3, got '$ENGINE'" >&2; exit 2 ;;
esac

MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n "${HOSTFILE:-}" && -f "$HOSTFILE" ]]; then   # processes in all: NUM_GPUS per host, or the hosts' slots
    HOSTS=$(awk '!/^[[:space:]]*(#|$)/ {n++} END {print n+0}' "$HOSTFILE")
    SLOTS=$(awk '!/^[[:space:]]*(#|$)/ {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) s += substr($i, 7)} END {print s+0}' "$HOSTFILE")
    CHECK_WORLD=$(( ${NUM_GPUS:-0} > 0 ? HOSTS * NUM_GPUS : SLOTS ))
    # processes per node, for parallel.shard_group's node layout (empty when the hosts' slots differ)
    CHECK_LOCAL=$(( ${NUM_GPUS:-0} > 0 ? NUM_GPUS : (HOSTS > 0 && SLOTS % HOSTS == 0 ? SLOTS / HOSTS : 0) ))
    [[ "$CHECK_LOCAL" -gt 0 ]] || CHECK_LOCAL=""
else
    CHECK_WORLD=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")}
    CHECK_LOCAL=$CHECK_WORLD
fi
# Validate the config for this world first: a config error is one line and exit code 2, before any launcher starts.
# When DS_ARGS picks the processes (--include, --exclude, --num_nodes, --num_gpus) the world is the launcher's to
# work out: the ranks then run the same checks themselves, at their real world size, before any work.
if [[ ! "${DS_ARGS:-}" =~ --(include|exclude|num_nodes|num_gpus) ]]; then
    WORLD_SIZE="$CHECK_WORLD" LOCAL_WORLD_SIZE="$CHECK_LOCAL" "$PYTHON" -m dora_dist.train --check "${CONFIG_ARGS[@]}" "parallel.engine=$ENGINE" \
        "${OVERRIDES[@]}" || exit $?
fi

LAUNCH=(deepspeed --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || { echo "deepspeed.sh: HOSTFILE '$HOSTFILE' not found" >&2; exit 2; }
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
    fi
    LAUNCH+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
    if [[ -n "${NODE_RANK:-}" ]]; then
        LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
    else
        LAUNCH+=(--launcher "${LAUNCHER:-pdsh}")
    fi
    [[ -n "${NUM_GPUS:-}" ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")
else
    if [[ -z "${NUM_GPUS:-}" ]]; then
        NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
    fi
    LAUNCH+=(--num_gpus "$NUM_GPUS")
fi
# shellcheck disable=SC2206
[[ -n "${DS_ARGS:-}" ]] && LAUNCH+=($DS_ARGS)

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}          # no ahead-of-time op builds; the torch AdamW is used
export TOKENIZERS_PARALLELISM=false

set -x
exec "${LAUNCH[@]}" --module dora_dist.train "${CONFIG_ARGS[@]}" "parallel.engine=$ENGINE" "${OVERRIDES[@]}"
