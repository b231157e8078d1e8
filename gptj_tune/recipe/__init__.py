"""The recipe: its schema (sections, validation), how it is read (YAML, `--set`, errors) and its
generated reference. Everything a caller needs is importable from `gptj_tune.recipe`."""

from .base import TINY_MODEL_NAME, Section
from .inputs import (
    METHOD_TYPES,
    CustomTemplate,
    DataSection,
    FullMethod,
    LoraMethod,
    Method,
    ModelSection,
    PromptTuningMethod,
    QLoraMethod,
    SourceSection,
    TinyModelSection,
)
from .load import load_recipe, parse_override, validate_recipe
from .reference import reference_markdown
from .runtime import (
    BENCHMARK_TASKS,
    DeepSpeedSection,
    DistributedSection,
    EvalSection,
    ExportSection,
    FsdpSection,
    LoggingSection,
    OutputSection,
    TrainSection,
    check_shard_size,
)
from .schema import Recipe

__all__ = [
    "BENCHMARK_TASKS", "METHOD_TYPES", "TINY_MODEL_NAME", "CustomTemplate", "DataSection", "DeepSpeedSection",
    "DistributedSection", "EvalSection", "ExportSection", "FsdpSection", "FullMethod", "LoraMethod", "Method",
    "LoggingSection", "ModelSection", "OutputSection", "PromptTuningMethod", "QLoraMethod", "Recipe", "Section", "SourceSection", "TinyModelSection",
    "TrainSection", "check_shard_size", "load_recipe", "parse_override", "reference_markdown", "validate_recipe",
]
