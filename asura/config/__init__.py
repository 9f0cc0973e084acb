"""Typed config: frozen dataclasses, YAML with `extends`, dotted overrides, strict validation."""

from asura.config.load import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    load_config,
    read_config_file,
    with_overrides,
)
from asura.config.schema import Config, DataConfig, DepthConfig, MeshConfig, ModelConfig, TrainConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DepthConfig",
    "MeshConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "read_config_file",
    "with_overrides",
]
