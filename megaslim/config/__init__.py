"""One config schema for every megaslim command: dataclasses, YAML files and dotted overrides.

choices (the Enums) -> schema (the dataclasses) -> validate (every check that needs no model) -> load.
"""
from __future__ import annotations

from megaslim.config.choices import (
    Aggregation,
    AmaxAlgo,
    Choice,
    CompressTeacher,
    CoreAttention,
    DType,
    FoldMode,
    Fp8Mode,
    Fp8Recipe,
    IntermediateLoss,
    KLKind,
    LayerMetric,
    NeuronSignal,
    SearchAxis,
    SparsityMethod,
    SparsityPattern,
    TransformerImpl,
)
from megaslim.config.errors import ConfigError
from megaslim.config.load import load_config, to_dict, to_yaml
from megaslim.config.paths import check_output_dir_writable, check_output_file_writable
from megaslim.config.schema import (
    CheckpointConfig,
    CompressConfig,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ExportConfigShape,
    GenerateConfig,
    ImportanceConfig,
    LoadSpec,
    ModelConfig,
    OfflineConfig,
    ParallelConfig,
    PruneConfig,
    SearchConfig,
    SparsityConfig,
    TrainConfig,
)
from megaslim.config.validate import (
    validate,
    validate_compress,
    validate_distill,
    validate_generate,
    validate_prune,
)

__all__ = [
    "Aggregation", "AmaxAlgo", "CheckpointConfig", "Choice", "CompressConfig", "CompressTeacher", "Config",
    "CoreAttention",
    "ConfigError", "DType", "DataConfig", "DistillConfig", "EvalConfig", "ExportConfig", "ExportConfigShape",
    "FoldMode", "Fp8Mode", "Fp8Recipe", "GenerateConfig", "ImportanceConfig", "IntermediateLoss", "KLKind",
    "LayerMetric", "LoadSpec", "ModelConfig", "NeuronSignal", "OfflineConfig", "ParallelConfig", "PruneConfig",
    "SearchAxis", "SearchConfig", "SparsityConfig", "SparsityMethod", "SparsityPattern", "TrainConfig",
    "TransformerImpl", "check_output_dir_writable", "check_output_file_writable",
    "load_config", "to_dict", "to_yaml", "validate", "validate_compress", "validate_distill",
    "validate_generate", "validate_prune",
]
