#!/usr/bin/env bash
# One command for a lent GPU (at most ~8 minutes on one H100): every CUDA path this project has, and its figures
# in one JSON file.
#
#   bash benchmarks/gpu_check.sh                          # -> benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --out /tmp/gpu.json      # elsewhere
#   bash benchmarks/gpu_check.sh --dry-run                # print the commands, run nothing (what the CPU test checks)
#
# Steps, each under its own time limit so one hang cannot eat the others' minutes:
#   1. pytest -m gpu: the CUDA-only tests, the bf16/fp16 magnitude-fidelity test on CUDA included (its figures go
#      into the JSON through DORA_DIST_FIGURES), bitsandbytes' CUDA 4-bit against our decode, allocator peak memory,
#      nccl (2 processes when 2 GPUs exist);
#   2. a QDoRA FSDP2 run of the quickstart (nf4 base, bf16): 2 processes over nccl when 2 GPUs exist, else one;
#   3. layer_bench.py on CUDA, bf16, 4096² and 8192², r = 16 and r = 384: LoRA vs our DoRA vs peft's DoRA;
#   4. train_bench.py on CUDA, bf16: step time and saved bytes, DoRA / LoRA / peft on one model.
# A failed step is recorded (exit status, last lines of its log) and the next one still runs; the script exits
# non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="benchmarks/results/gpu_check.json"
DRY_RUN=0
usage() { echo "usage: bash benchmarks/gpu_check.sh [--out FILE] [--dry-run]" >&2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { usage; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [ "$DRY_RUN" = 1 ]; then
  NGPU="${GPU_CHECK_DRY_RUN_GPUS:-2}"      # the commands as they would be for this many GPUs
else
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check.sh: no CUDA device visible to torch (torch.cuda.device_count() = $NGPU)" >&2
    exit 1
  fi
fi
NPROC=$(( NGPU >= 2 ? 2 : 1 ))
STEPS_FILE="$WORK/steps.tsv"
: > "$STEPS_FILE"

# run NAME LIMIT_S CMD...: the command under `timeout`, its log and timing recorded for the JSON
run() {
  local name="$1" limit="$2"; shift 2
  if [ "$DRY_RUN" = 1 ]; then
    echo "CMD: $*"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local start rc
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 5 "$WORK/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "$*" >> "$STEPS_FILE"
}

ENGINE=$([ "$NPROC" = 2 ] && echo fsdp2 || echo none)
QUICK=(--config configs/quickstart.yaml quantization.mode=nf4 training.precision=bf16 "parallel.engine=$ENGINE"
       training.max_steps=30 checkpoint.every_steps=1000 "output.dir=$WORK/qdora")

export DORA_DIST_FIGURES="$WORK/figures.jsonl"
run pytest_gpu 170 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml "$WORK/pytest_gpu.xml"
run qdora_fsdp2 90 torchrun --standalone --nproc-per-node "$NPROC" -m dora_dist.train "${QUICK[@]}"
for size in 4096 8192; do
  for rank in 16 384; do
    run "layer_${size}_r${rank}" 30 "$PY" benchmarks/layer_bench.py --device cuda --dtype bfloat16 \
      --in-features "$size" --out-features "$size" --tokens 4096 --rank "$rank" --repeat 7 \
      --json "$WORK/layer_${size}_r${rank}.json"
  done
done
run train_bench 100 "$PY" benchmarks/train_bench.py --device cuda --dtype bf16 --hidden 2048 --intermediate 5632 \
  --layers 4 --heads 16 --seq 1024 --batch 4 --vocab 32000 --r 16 --steps 10 --out "$WORK/train_bench.json"

if [ "$DRY_RUN" = 1 ]; then
  rm -rf "$WORK"
  exit 0
fi

mkdir -p "$(dirname "$OUT")"
"$PY" benchmarks/gpu_check_report.py "$WORK" "$OUT"   # exits 1 if any step failed
