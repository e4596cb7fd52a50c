"""pytest's setup for every test module: the repository and ../shared/data paths, offline hubs,
one torch thread per test process, a free port, and `shared_path`, which skips a test cleanly
when ../shared is not there. What test modules share beyond that is in helpers.py."""
import os
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
PY = sys.executable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


# cases that repeat another case's mechanism on other inputs, left out of the default suite (kept
# near 20 minutes on 2 cores): MMSCALE_LONG_TESTS=1 runs them
LONG = pytest.mark.skipif(os.environ.get("MMSCALE_LONG_TESTS") != "1",
                          reason="opt-in: MMSCALE_LONG_TESTS=1 (a second case of a mechanism the suite tests)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_path(*parts) -> str:
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)}")
    return path


def tiny_model_config(**changes):
    """The tiny recipe as a Config, with `changes` as dotted overrides (key=value)."""
    from mmscale.config import load_config
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [f"{k}={v}" for k, v in changes.items()])
    return cfg
