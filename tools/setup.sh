#!/usr/bin/env bash
# Fresh-machine setup: .venv with the CPU-checked torch pair, DeepSpeed without compiled ops,
# and mmscale (editable) with its test extras. Safe to re-run; GPU users who bring their own
# torch can skip this and `pip install -e .[test]` into their environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # the only torch/torchvision pair that installs (and works together) from the local index
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[test]"
.venv/bin/python -c "import torch, deepspeed, open_clip, timm, transformers; print('mmscale setup ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING
