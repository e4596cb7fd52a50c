import dataclasses
import os
import subprocess

import pytest
import yaml

from conftest import PY, ROOT
from mmscale.config import ConfigError, OptimConfig, load_config, save_config
from mmscale.engine.backend import check_world

RECIPES = sorted(f for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".yaml"))


def _leaves(tree, prefix=""):
    """(dotted key, value) of every scalar or list a YAML tree sets."""
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_key_lands_in_the_typed_config(recipe, tmp_path):
    """Each value a recipe (with its bases) sets is in the parsed config as written, the saved
    config.yaml holds only what the recipe's task uses and reads back equal. No data needed:
    file checks are what check_files adds."""
    from mmscale.config import MODEL_CONFIGS, read_recipe, to_dict
    path = os.path.join(ROOT, "recipes", recipe)
    cfg = load_config(path, check_files=False)
    saved = to_dict(cfg)
    for key, value in _leaves(read_recipe(path)):
        got = _get(saved, key)
        if isinstance(value, list) and value and isinstance(value[0], dict):  # modalities: their set keys
            for item, parsed in zip(value, got):
                assert all(parsed[k] == v or parsed[k] == {**parsed[k], **v} for k, v in item.items()), (key, item)
        else:
            assert got == value or (isinstance(value, str) and got == float(value)), (key, value, got)
    assert set(saved["model"]) == {f.name for f in dataclasses.fields(MODEL_CONFIGS[cfg.task])}
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml"), check_files=False) == cfg


def test_cmla_recipe_is_the_paper_setup(tmp_path):
    (tmp_path / "_meta").mkdir()
    (tmp_path / "_meta" / "shards.json").write_text("{}")
    cfg = load_config(os.path.join(ROOT, "recipes", "cmla.yaml"), [f"data.shards={tmp_path}"])
    assert cfg.model.image.name == "vit_base_patch16_224" and cfg.model.text.name == "bert-base-uncased"
    assert cfg.model.heads.enabled and cfg.model.temperature == 0.07 and not cfg.model.learn_temperature
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule) == ("adam", 1e-4, "cosine")
    assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.train.zero_stage, cfg.train.precision) == (4096, 15, 2, "bf16")
    assert 0 < cfg.train.grad_cache_chunk < 4096 // 8
    assert cfg.data.type == "shards" and cfg.data.shards == str(tmp_path)
    assert not load_config(os.path.join(ROOT, "recipes", "cmla_no_heads.yaml"),
                           [f"data.shards={tmp_path}"]).model.heads.enabled
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(os.path.join(ROOT, "recipes", "cmla.yaml"), ["data.shards=/nonexistent/cc3m"])


def test_dotted_overrides_are_typed():
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"),
                      ["optim.lr=3e-4", "train.zero_stage=3", "model.heads.enabled=false", "eval.templates=['{}!']"])
    assert cfg.optim.lr == 3e-4 and cfg.train.zero_stage == 3 and cfg.model.heads.enabled is False
    assert cfg.eval.templates == ["{}!"]


@pytest.mark.parametrize("override, key", [
    ("model.imag.name=x", "model.imag"),
    ("train.zero_stage=two", "train.zero_stage"),
    ("optim.lr=fast", "optim.lr"),
    ("train.precision=fp8", "train.precision"),
    ("model.image.pretrained=/nonexistent/vit.safetensors", "model.image.pretrained"),
    ("data.type=coco", "data.root"),
    ("train.steps=0", "train.steps"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
])
def test_bad_input_names_the_key(override, key, tmp_path):
    over = [override, "train.epochs=0"] if override == "train.steps=0" else [override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), over)


def test_batch_must_divide_ranks_and_chunks():
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), ["train.global_batch_size=64", "train.grad_cache_chunk=12"])
    with pytest.raises(ConfigError, match="train.grad_cache_chunk"):
        check_world(cfg, 2)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_world(cfg, 3)
    cfg.train.grad_cache_chunk = 8
    assert check_world(cfg, 2) == (32, 8)


def test_gradient_reduction_keys():
    """train.grad_cache_reduce=chunk needs ZeRO 2-3 (ZeRO 0-1 reduce once a step whatever it says);
    the DeepSpeed config reduces in train.grad_reduce_dtype and, under bf16 with ZeRO 1-3, sums a
    step's gradients in fp32 (ZeRO 0 has no such setting in DeepSpeed: engine/reduction.py's)."""
    from mmscale.engine.backend import deepspeed_config
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    with pytest.raises(ConfigError, match=r"train\.grad_cache_reduce: chunk needs ZeRO 2-3"):
        load_config(tiny, ["train.zero_stage=1", "train.grad_cache_reduce=chunk"])
    load_config(tiny, ["train.zero_stage=3", "train.grad_cache_reduce=chunk"])
    for stage in range(4):
        ds = deepspeed_config(load_config(tiny, [f"train.zero_stage={stage}", "train.precision=bf16"]), 32)
        assert ds["communication_data_type"] == "fp32"
        assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage else None)
    ds = deepspeed_config(load_config(tiny, ["train.precision=bf16", "train.grad_reduce_dtype=bf16"]), 32)
    assert ds["communication_data_type"] == "bf16"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


def test_cli_exits_2_with_one_line_naming_the_key():
    r = subprocess.run([PY, "mmscale/train.py", "recipes/tiny.yaml", "train.batch=3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.batch" in lines[0] and "unknown key" in lines[0]
    r = subprocess.run([PY, "mmscale/train.py", "recipes/nope.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "recipes/nope.yaml" in r.stderr


def test_image_size_and_the_towers_own_size_agree_or_fail_in_one_line():
    """tiny.yaml's ViT states img_size 32: image_size 64 is a config error naming both keys, before
    anything starts (exit 2); where the tower states no size it is built at image_size."""
    r = subprocess.run([PY, "mmscale/train.py", "recipes/tiny.yaml", "model.image.image_size=64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "model.image.image_size: 64" in lines[0] and "model.image.kwargs.img_size is 32" in lines[0]
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    with pytest.raises(ConfigError, match=r"model.image.image_size: 48.*model.image.kwargs.model_cfg.vision_cfg.image_size"):
        load_config(tiny, ["model.image.source=open_clip", "model.image.image_size=48",
                           "model.image.kwargs={model_cfg: {embed_dim: 32, vision_cfg: {image_size: 32}}}"])
    cfg = load_config(tiny, ["model.image.image_size=64", "model.image.kwargs={patch_size: 8, embed_dim: 96, "
                                                           "depth: 1, num_heads: 3}"])
    import torch
    from mmscale.models.towers import build_tower
    tower = build_tower(cfg.model.image)
    assert tower(torch.zeros(1, 3, 64, 64)).shape == (1, 96)
    oc = build_tower(load_config(tiny, ["model.image.source=open_clip", "model.image.image_size=48",
                                        "model.image.kwargs={model_cfg: {embed_dim: 32, vision_cfg: {layers: 1, "
                                        "width: 64, head_width: 32, patch_size: 8}, text_cfg: {context_length: 16, "
                                        "vocab_size: 64, width: 32, heads: 2, layers: 1}}}"]).model.image)
    assert oc(torch.zeros(1, 3, 48, 48)).shape == (1, 32)


def test_the_siglip_recipe_and_the_loss_checks():
    cfg = load_config(os.path.join(ROOT, "recipes", "siglip.yaml"), check_files=False)
    assert (cfg.loss.name, cfg.loss.exchange, cfg.loss.tile) == ("siglip", "bidir", 1024)
    # the paper's init: t' = log 10 (temperature 0.1), b = -10, both learnt
    assert (cfg.model.temperature, cfg.model.learn_temperature, cfg.model.logit_bias) == (0.1, True, -10.0)
    assert cfg.optim.name == "adamw" and cfg.optim.decay_exclusions
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    with pytest.raises(ConfigError, match=r"loss.name: siglip needs a logit bias: set model.logit_bias"):
        load_config(tiny, ["loss.name=siglip"])
    with pytest.raises(ConfigError, match=r"model.logit_bias: -10.0 is set but loss.name is infonce"):
        load_config(tiny, ["model.logit_bias=-10"])
    with pytest.raises(ConfigError, match=r"loss.tile: must be >= 0"):
        load_config(tiny, ["loss.tile=-1"])
    with pytest.raises(ConfigError, match=r"loss.exchange"):
        load_config(tiny, ["loss.exchange=shift"])
    with pytest.raises(ConfigError, match=r"loss.positives: label needs class labels, and data.type coco has none"):
        load_config(tiny, ["loss.positives=label", "data.type=coco"], check_files=False)
    assert load_config(tiny, ["loss.positives=label"]).loss.positives == "label"  # digits have classes


# ---------------------------------------------------------------- the schema's metadata, the builder, --explain

def _schema_classes():
    import inspect
    from mmscale.config import schema
    return [c for _, c in inspect.getmembers(schema, inspect.isclass)
            if dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]


def test_every_field_has_help_and_its_default_is_in_range():
    from mmscale.config.fields import Range, check_limits
    classes = _schema_classes()
    assert len(classes) >= 20
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            check_limits(f, default, f"{cls.__name__}.{f.name}")
    r = Range.parse("[0, 1)")
    assert 0 in r and 0.5 in r and 1 not in r and -0.1 not in r and str(r) == "in [0, 1)"
    r = Range.parse("(0, 1]")
    assert 0 not in r and 1 in r and str(r) == "in (0, 1]"
    assert 10 in Range.parse(">= 10") and 9 not in Range.parse(">= 10") and 0 not in Range.parse("> 0")
    with pytest.raises(ValueError):
        Range.parse("0..1")


@pytest.mark.parametrize("override, message", [
    ("model.image.patch_dropout=1.0", r"model\.image\.patch_dropout: must be in \[0, 1\), got 1\.0$"),
    ("train.zero_stage=5", r"train\.zero_stage: 5 is not one of 0, 1, 2, 3$"),
    ("optim.plateau.factor=1", r"optim\.plateau\.factor: must be in \(0, 1\), got 1\.0$"),
    ("train.dist_timeout_s=5", r"train\.dist_timeout_s: must be >= 10, got 5$"),
    ("model.temperature=0", r"model\.temperature: must be > 0, got 0\.0$"),
])
def test_ranges_are_enforced_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [override])


def test_a_range_inside_a_list_names_the_item():
    with pytest.raises(ConfigError, match=r"^model\.modalities\.0\.tower\.image_size: must be >= 1, got 0$"):
        load_config(os.path.join(ROOT, "recipes", "cbmf_tiny.yaml"), ["model.modalities.0.tower.image_size=0"])


def test_a_union_tries_each_member_and_says_why_each_refused():
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert load_config(tiny, ["model.image.pretrained=true"], check_files=False).model.image.pretrained is True
    assert load_config(tiny, ["model.image.pretrained=laion2b"]).model.image.pretrained == "laion2b"
    with pytest.raises(ConfigError, match=r"^model\.image\.pretrained: 3 matches none of bool, str \(bool: expected "
                                          r"true/false, got 3; str: expected a string, got 3\)$"):
        load_config(tiny, ["model.image.pretrained=3"])
    with pytest.raises(ConfigError, match=r"^model\.logit_bias: 'high' matches none of float, null \(float: expected "
                                          r"a number, got 'high'; null: not null\)$"):
        load_config(tiny, ["model.logit_bias=high", "loss.name=siglip"])
    from typing import Union
    from mmscale.config import build

    @dataclasses.dataclass
    class Two:
        x: Union[int, list[int]] = 0

    assert build(Two, {"x": 3}).x == 3 and build(Two, {"x": [1, 2]}).x == [1, 2]
    with pytest.raises(ConfigError, match=r"^x: \[1, 'a'\] matches none of int, list of ints \(int: expected an "
                                          r"integer, got \[1, 'a'\]; list of ints: x\.1: expected an integer, got 'a'\)$"):
        build(Two, {"x": [1, "a"]})


def test_model_side_checks_fail_at_load_time():
    """What the models used to find when they were built (after the process group started)."""
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    with pytest.raises(ConfigError, match=r"^model\.fusion\.type: shared_block needs token outputs"):
        load_config(tiny, ["model.fusion.type=shared_block", "model.text.source=open_clip"])
    with pytest.raises(ConfigError, match=r"^model\.fusion\.num_heads: 8 does not divide model\.fusion\.width 100$"):
        load_config(tiny, ["model.fusion.type=shared_block", "model.fusion.width=100"])
    with pytest.raises(ConfigError, match=r"^model\.text\.config_overrides: only allowed with pretrained: false$"):
        load_config(tiny, ["model.text.pretrained=true"])


def test_explain_a_key_a_section_the_task_variants_and_an_unknown_key(capsys):
    from mmscale.train import main
    assert main(["--explain", "model.image.patch_dropout"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model.image.patch_dropout: float = 0.0, in [0, 1)  [task clip]") and "FLIP" in out
    assert main(["--explain", "model.modalities.1.tower.unlocked_layers"]) == 0  # any index
    assert "model.modalities.<i>.tower.unlocked_layers: int = -1, >= -1  [task classify, kind text]" in \
        capsys.readouterr().out
    assert main(["--explain", "optim"]) == 0
    out = capsys.readouterr().out
    assert all(f"optim.{f.name}:" in out for f in dataclasses.fields(OptimConfig)) and "optim.plateau.factor:" in out
    assert main(["--explain", "model"]) == 0  # every task's model
    out = capsys.readouterr().out
    assert all(f"model: mapping  [task {t}]" in out for t in ("clip", "classify", "cbmf"))
    assert main([os.path.join(ROOT, "recipes", "cbmf_tiny.yaml"), "--explain", "model"]) == 0  # the recipe's task
    out = capsys.readouterr().out
    assert "model.dfe.num_heads: int = 4, >= 1  [task cbmf]" in out and "task clip" not in out
    assert main(["--explain", "model.dfe", "--task", "clip"]) == 2
    assert capsys.readouterr().err == "mmscale: config error: model.dfe: not a key of task clip (task cbmf has it)\n"
    assert main(["--explain", "optim.plateu.factor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.plateu.factor: unknown key (did you mean optim.plateau.factor" in err


def test_explain_lists_every_key_and_docs_config_md_is_current(capsys):
    from mmscale.config.doc import keys, markdown
    from mmscale.train import main
    assert main(["--explain"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{k.key}: {k.type}" in "\n" + out for k in keys()) and len(keys()) > 180
    with open(os.path.join(ROOT, "docs", "CONFIG.md")) as fh:
        assert fh.read() == markdown(), "docs/CONFIG.md is stale: python -m mmscale.config.doc > docs/CONFIG.md"
