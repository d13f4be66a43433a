"""Config: YAML sections as frozen dataclasses, strict loading, overrides, resolved dumps."""

from moetune.config.loader import config_to_dict, dump_config, load_config, parse_override, save_config
from moetune.config.schema import (
    AdvancedConfig,
    Config,
    DataConfig,
    InferenceConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    MoeConfig,
    PostTrainingConfig,
    SourceConfig,
    TrainingConfig,
    UpcyclingConfig,
    ValidationConfig,
)

__all__ = [
    "AdvancedConfig", "Config", "DataConfig", "InferenceConfig", "LoggingConfig", "LoraConfig", "ModelConfig",
    "MoeConfig", "PostTrainingConfig", "SourceConfig", "TrainingConfig", "UpcyclingConfig",
    "ValidationConfig", "config_to_dict", "dump_config", "load_config", "parse_override", "save_config",
]
