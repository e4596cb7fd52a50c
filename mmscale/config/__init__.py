"""Recipe schema: plain YAML -> typed dataclasses, with dotted CLI overrides.

Every problem with a recipe is raised as ConfigError naming the dotted key, so the entry point
can print one line and exit 2 before any process group or model exists. One job per module:
fields.py (a field's default, help and range; ConfigError), schema.py (the dataclasses),
build.py (YAML -> typed dataclasses), recipes.py (YAML files, `base:`, overrides, saving),
validate.py (every rule between fields that the recipe alone decides), doc.py (`mmscale-train --explain`, docs/CONFIG.md).
Imports from mmscale: files only.
"""
from .build import build, check_type
from .fields import ConfigError, Range, f
from .recipes import config_from_dict, load_config, parse_overrides, read_recipe, save_config, to_dict
from .schema import (LOSS_CONFIGS, MODEL_CONFIGS, CBMFLossConfig, CBMFModelConfig, ClassifierConfig,
                     ClassifyLossConfig, ClassifyModelConfig, ClipLossConfig, ClipModelConfig, Config, DataConfig,
                     DFEConfig, EarlyStoppingConfig, EmaConfig, EvalConfig, FusionConfig, HeadConfig,
                     ImageTowerConfig, ModalityConfig, OptimConfig, PlateauConfig, TextTowerConfig, TrainConfig,
                     image_size, tower_configs, towers)
from .validate import (validate, validate_clip_loss, validate_files, validate_image_sizes, validate_modalities,
                       validate_tower_controls)

__all__ = [
    "CBMFLossConfig", "CBMFModelConfig", "ClassifierConfig", "ClassifyLossConfig", "ClassifyModelConfig",
    "ClipLossConfig", "ClipModelConfig", "Config", "ConfigError", "DFEConfig", "DataConfig", "EarlyStoppingConfig",
    "EmaConfig", "EvalConfig", "FusionConfig", "HeadConfig", "ImageTowerConfig", "LOSS_CONFIGS", "MODEL_CONFIGS",
    "ModalityConfig", "OptimConfig", "PlateauConfig", "Range", "TextTowerConfig", "TrainConfig", "build",
    "check_type", "config_from_dict", "f", "image_size", "load_config", "parse_overrides", "read_recipe",
    "save_config", "to_dict", "tower_configs", "towers", "validate", "validate_clip_loss", "validate_files",
    "validate_image_sizes", "validate_modalities", "validate_tower_controls",
]
