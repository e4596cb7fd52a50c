"""The package's shape: imports flow one way (lazy imports inside functions included), the tools
are console scripts that explain themselves, and towers never hold 0-dim parameters."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import PY, ROOT

PKG = os.path.join(ROOT, "mmscale")

# Lower layers never import higher ones; modules of one layer may import each other (acyclically).
LAYERS = [
    {"files", "config", "seeds"},
    {"dist", "placement"},
    {"data"},
    {"models"},
    {"losses", "gradcache"},
    {"eval"},
    {"export"},
    {"tasks"},
    {"engine"},
    {"train", "cli"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _modules() -> dict[str, str]:
    """mmscale.<dotted> -> file, packages as their __init__."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(module: str, path: str, known: set) -> set:
    """Every mmscale module `path` imports, at the top or inside a function."""
    is_pkg = path.endswith("__init__.py")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (prefix, node.module or "") if p)
            # `from pkg import sub` needs the module pkg.sub; `from pkg import name`, pkg itself
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        for name in names:
            while name and name not in known:  # mmscale.data.images.Sample -> mmscale.data.images
                name = name.rpartition(".")[0]
            if name.startswith("mmscale.") and name != module:
                found.add(name)
    return found


def test_imports_flow_one_way_and_have_no_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items() if m != "mmscale"}
    upward = [(m, d) for m, deps in graph.items() for d in deps if d != "mmscale" and _layer(d) > _layer(m)]
    assert not upward, f"imports against the layer order (docs/DESIGN.md): {upward}"
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, d])}")
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])
    assert len(graph) > 25  # the walk saw the package, not an empty folder


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walk above must catch a lazy upward import; shown on a throwaway module."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ..engine.trainer import Trainer\n    from . import layers\n")
    found = _imports("mmscale.models.m", str(path), {"mmscale.engine.trainer", "mmscale.models.layers",
                                                      "mmscale.models"})
    assert found == {"mmscale.engine.trainer", "mmscale.models.layers"}


SCRIPTS = ["mmscale-train", "mmscale-eval", "mmscale-export", "mmscale-build-shards", "mmscale-sweep", "mmscale-bench-loader",
           "mmscale-bench", "mmscale-curate"]


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "reduce",
               "gather", "scatter", "barrier", "new_group", "send", "recv", "isend", "irecv"}


def _distributed_calls(path: str) -> list[str]:
    """Calls of torch.distributed collectives in a file: `dist.X(...)`, `torch.distributed.X(...)`,
    or X imported from torch.distributed."""
    tree = ast.parse(open(path).read())
    aliases, direct = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in aliases or owner == "torch.distributed":
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {owner}.{f.attr}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {f.id}")
    return found


def test_collectives_live_in_dist_py_only(tmp_path):
    """Every collective goes through mmscale/dist.py, whose helpers put tensors on the communication
    device (tests/test_dist.py): a torch.distributed call elsewhere could hand NCCL a CPU tensor."""
    elsewhere = [c for module, path in _modules().items() if module != "mmscale.dist"
                 for c in _distributed_calls(path)]
    assert not elsewhere, elsewhere
    assert _distributed_calls(os.path.join(PKG, "dist.py"))  # the checker sees them where they are
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as d\nfrom torch.distributed import all_reduce as ar\n"
                   "def f(t):\n    d.all_reduce(t)\n    ar(t)\n    import torch\n    torch.distributed.barrier()\n")
    assert len(_distributed_calls(str(bad))) == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_explain_themselves(script):
    exe = os.path.join(os.path.dirname(PY), script)
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {script}") and len(r.stdout.splitlines()) > 8
    tool = os.path.join(ROOT, "tools", script[len("mmscale-"):].replace("-", "_") + ".py")
    if os.path.exists(tool):  # the same program as python tools/x.py, with no sys.path edits
        assert "sys.path" not in open(tool).read()
        again = subprocess.run([PY, tool, "--help"], capture_output=True, text=True, timeout=120, cwd="/")
        assert again.returncode == 0 and again.stdout == r.stdout


def test_build_shards_help_gives_every_default():
    r = subprocess.run([os.path.join(os.path.dirname(PY), "mmscale-build-shards"), "--help"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    import dataclasses
    from mmscale.data.shard_builder import BuildOptions
    text = " ".join(r.stdout.split())
    for f in dataclasses.fields(BuildOptions):
        flag = "--" + f.name.replace("_", "-")
        after = text.split(f"{flag} {f.name.upper()} ", 1)[1]
        assert after.split(" --", 1)[0].endswith(f"(default: {f.default!r})"), (flag, after[:120])


# ---------------------------------------------------------------- 0-dim parameters

OPEN_CLIP_TINY = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                                  "head_width": 32, "patch_size": 8},
                                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                             "layers": 1}}}


def test_towers_have_no_0dim_parameters():
    """open_clip's text half keeps CLIP's 0-dim logit_scale, which it never reads: dropped. A
    0-dim parameter a tower does use is stored [1] and still reaches the tower as a scalar."""
    from mmscale.config import TextTowerConfig
    from mmscale.models.towers import Tower, _no_scalar_parameters, build_tower
    tower = build_tower(TextTowerConfig(source="open_clip", name="tiny", config_overrides=OPEN_CLIP_TINY))
    assert all(p.dim() > 0 for p in tower.parameters())
    assert not any("logit_scale" in k for k in tower.state_dict())
    tok = tower.tokenize_fn()(["a photo of a cat"])
    assert tower(tok["input_ids"]).shape == (1, 32)

    class Gated(Tower):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Parameter(torch.tensor(0.5))
            self.width = 3

        def forward(self, x):
            assert self.gate.dim() == 0
            return x * self.gate.exp()

    gated = Gated()
    x = torch.ones(2, 3)
    before = gated(x)
    _no_scalar_parameters(gated)
    assert [p.shape for p in gated.parameters()] == [(1,)]
    out = gated(x)
    assert torch.equal(out, before)
    out.sum().backward()
    assert next(gated.parameters()).grad.shape == (1,)


# ---------------------------------------------------------------- the model contract

def test_every_task_model_meets_the_contract():
    """models/contract.py is what the engine, tasks, evaluation and export call on a model: every
    task's model satisfies it, the image-text ones (clip, cbmf) can be embedded by the evaluators,
    CBMF's towers' features can be cached, and the learnt temperature is the one Bounded module."""
    from helpers import CBMF_RANDOM_TOWERS, views_config
    from mmscale.config import load_config
    from mmscale.models import build_model
    from mmscale.models.contract import Bounded, FeatureModel, ImageTextModel, Model
    clip = build_model(load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), ["model.learn_temperature=true"]))
    cbmf = build_model(load_config(os.path.join(ROOT, "recipes", "cbmf_tiny.yaml"),
                                   [CBMF_RANDOM_TOWERS], check_files=False))
    cfg = load_config(None, views_config("/nonexistent", "train.steps=1"), check_files=False)
    for m, d in zip(cfg.model.modalities, (5, 7)):  # what task classify fills in from the data
        m.input_dim = d
    cfg.model.num_classes = 3
    classify = build_model(cfg)
    assert all(isinstance(m, Model) for m in (clip, cbmf, classify))
    assert isinstance(clip, ImageTextModel) and isinstance(cbmf, ImageTextModel)
    assert isinstance(cbmf, FeatureModel) and not isinstance(clip, FeatureModel)
    assert not isinstance(classify, ImageTextModel)
    bounded = [type(m).__name__ for m in clip.modules() if isinstance(m, Bounded)]
    assert bounded == ["LogitScale"]
    (p, (lo, hi)), = next(m for m in clip.modules() if isinstance(m, Bounded)).parameter_bounds().items()
    assert p is clip.logit_scale.log_value and lo is None and hi is not None
    tok = clip.tokenize(["a photo of a seven"])
    assert clip.encode_text(tok["input_ids"], tok["attention_mask"]).norm(dim=-1).sub(1).abs().max() < 1e-5


# ---------------------------------------------------------------- one home for seeds

def test_no_seed_is_computed_outside_seeds_py():
    """Exact resume rests on every draw being a function of (seed, purpose, keys): mmscale/seeds.py
    derives each one; no other module seeds a generator itself (scikit-learn's random_state, handed
    an evaluator's seed as it is, is not a derivation)."""
    import re
    found = []
    for module, path in _modules().items():
        if module == "mmscale.seeds":
            continue
        for n, line in enumerate(open(path), 1):
            if re.search(r"manual_seed\(|default_rng\(|\bhash\(\(|\bGenerator\(\)", line.split("#")[0]):
                found.append(f"{path}:{n}: {line.strip()}")
    assert not found, found


def test_seed_formulas_keep_the_documented_sample_orders():
    """seeds.py kept each purpose's formula from before it became one module (documented runs'
    samples depend on them); a purpose called with the wrong keys is a one-line error."""
    from mmscale.seeds import mix, seed_for
    assert seed_for("epoch_order", 7, 3) == 7 * 100_003 + 3
    assert seed_for("augment", 7, 3, 11) == (7 * 1_000_003 + 3) * 10_000_019 + 11
    assert seed_for("step", 7, 5, 1) == hash((7, 5, 1)) % 2 ** 62
    assert seed_for("stream_augment", 7, 2, 9) == mix(7, 2, 9) >> 1
    with pytest.raises(TypeError, match=r"'step' takes the keys \(step, rank\), got 1"):
        seed_for("step", 7, 5)
