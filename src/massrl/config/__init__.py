"""Typed run configuration: YAML files plus dotted command-line overrides.

Every key is declared in `schema`. Unknown keys, wrong types and impossible values are errors
that name the key (and, for a misspelling, the closest valid key), so a typo can never be
silently ignored.
"""

from massrl.config.augment import AugmentConfig, RandAugmentConfig, SimCLRColourConfig
from massrl.config.files import (
    DATASET_KEYS,
    PACKAGE_CONFIGS,
    build_config,
    dotted_items,
    load_yaml,
    parse_overrides,
    parse_value,
    resolve_config_path,
    set_dotted,
    to_yaml,
)
from massrl.config.schema import (
    DATASETS,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainerConfig,
    WandbConfig,
    default_root,
    root_path,
)
from massrl.config.section import ConfigError, Section
from massrl.config.text import describe_options

__all__ = [
    "DATASETS", "DATASET_KEYS", "PACKAGE_CONFIGS", "AugmentConfig", "ConfigError",
    "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimizerConfig",
    "RandAugmentConfig", "RunConfig", "Section", "SimCLRColourConfig", "TrainerConfig",
    "WandbConfig", "build_config",
    "describe_options", "load_yaml", "parse_overrides", "parse_value", "resolve_config_path",
    "default_root", "root_path", "dotted_items",
    "set_dotted", "to_yaml",
]
