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
# the multi-host tests' simulated cluster (tests/cluster.py) needs ip (iproute2), unshare and
# nsenter (util-linux): installed where this runs as root on an apt system; elsewhere they skip
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
    ! { command -v ip && command -v unshare && command -v nsenter; } >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends iproute2 util-linux >/dev/null 2>&1 || \
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends iproute2 util-linux >/dev/null 2>&1; }; } \
    || echo "tools/setup.sh: could not install iproute2/util-linux; the multi-host tests will skip"
fi
.venv/bin/python -c "import torch, deepspeed, open_clip, timm, transformers; print('mmscale setup ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING
