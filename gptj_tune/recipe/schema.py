"""The Recipe: one strict, typed, read-only description of a fine-tuning run, the sections together
and the checks that span them."""

from __future__ import annotations

import yaml
from pydantic import BaseModel, Field, model_validator

from .base import TINY_MODEL_NAME, Section
from .inputs import DataSection, LoraMethod, Method, ModelSection, PromptTuningMethod, QLoraMethod
from .runtime import DistributedSection, EvalSection, ExportSection, LoggingSection, OutputSection, TrainSection


class Recipe(Section):
    description: str = Field("", description="One line shown by `gptj-tune recipes`.")
    model: ModelSection = Field(default_factory=ModelSection, description="Base model and tokenizer.")
    method: Method = Field(default_factory=lambda: LoraMethod(kind="lora"), description="full, lora, qlora or prompt_tuning.")
    data: DataSection = Field(default_factory=DataSection, description="Datasets, template, packing.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimizer, schedule, steps, checkpoints.")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Processes and engine.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation during and after training.")
    export: ExportSection = Field(default_factory=ExportSection, description="Export defaults.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Experiment trackers.")
    output: OutputSection = Field(description="Where the run directory goes.")

    @model_validator(mode="after")
    def _cross_checks(self):
        """Checks across sections, each run (not only up to the first that fails): every problem is
        reported at once, one per line."""
        problems = []
        checks = (Recipe._check_benchmarks_during_training, Recipe._check_tiny_context, Recipe._check_optimizer,
                  Recipe._check_qlora, Recipe._check_prompt_tuning, Recipe._check_compile, Recipe._check_precision)  # fmt: skip
        for check in checks:
            try:
                check(self)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _check_benchmarks_during_training(self):
        d = self.distributed
        sharded = d.backend == "fsdp" or (d.backend == "deepspeed" and d.zero.config is None and d.zero.zero_stage == 3)
        if self.eval.benchmark_every is not None and sharded:
            raise ValueError(
                "eval.benchmark_every needs the whole model on one process, which ZeRO-3/FSDP do not give; "
                "run `gptj-tune eval RUN` after training instead"
            )
        return self

    def _check_tiny_context(self):
        if self.model.name_or_path == TINY_MODEL_NAME and self.data.max_length > self.model.tiny.context:
            raise ValueError(
                f"data.max_length {self.data.max_length} is longer than the tiny model's context (model.tiny.context "
                f"{self.model.tiny.context}): lower data.max_length or raise model.tiny.context"
            )
        return self

    def _check_optimizer(self):
        if self.train.optimizer == "adamw_8bit" and self.distributed.backend in ("deepspeed", "fsdp"):
            raise ValueError(
                f"train.optimizer adamw_8bit runs on single and ddp; {self.distributed.backend} shards the optimizer "
                f"states itself (set train.optimizer: adamw, or distributed.backend: ddp)"
            )
        return self

    def _check_qlora(self):
        if not isinstance(self.method, QLoraMethod):
            return self
        if self.distributed.backend in ("deepspeed", "fsdp"):
            raise ValueError(
                f"method.kind qlora holds the base in 4 bits, which {self.distributed.backend} cannot shard; set "
                f"distributed.backend to single or ddp, or use method.kind lora with {self.distributed.backend}"
            )
        if self.train.compile is True:
            raise ValueError("train.compile: true does not take a 4-bit base (bitsandbytes' layers); set it to auto or false")
        return self

    def _check_prompt_tuning(self):
        if not isinstance(self.method, PromptTuningMethod):
            return self
        n = self.method.num_virtual_tokens
        if self.distributed.backend in ("deepspeed", "fsdp"):
            raise ValueError(
                f"method.kind prompt_tuning trains {n} vectors on a frozen model, which needs no sharding; "
                f"set distributed.backend to single or ddp (not {self.distributed.backend})"
            )
        if self.data.max_length < n + 8:
            raise ValueError(
                f"data.max_length {self.data.max_length} leaves too little room beside the {n}-token soft prompt "
                f"(method.num_virtual_tokens) that starts every example: raise data.max_length to at least {n + 8}"
            )
        return self

    def prompt_slots(self) -> int:
        """Positions the soft prompt takes at the start of every example (0 unless prompt tuning)."""
        return self.method.num_virtual_tokens if isinstance(self.method, PromptTuningMethod) else 0

    def _check_compile(self):
        if self.train.compile is True and self.distributed.backend in ("deepspeed", "fsdp"):
            raise ValueError(
                f"train.compile works with distributed.backend single or ddp, not {self.distributed.backend} "
                "(its weight gathering runs inside the blocks); set train.compile: auto or false"
            )
        return self

    def _check_precision(self):
        weights, autocast = self.model.dtype, self.distributed.mixed_precision
        if (autocast == "fp16" and weights in ("bfloat16", "bf16")) or (autocast == "bf16" and weights in ("float16", "fp16")):
            raise ValueError(
                f"distributed.mixed_precision {autocast} contradicts model.dtype {weights}: use the same 16-bit "
                f"type for both, or model.dtype float32 with mixed precision"
            )
        return self

    def computes_in_16_bits(self) -> bool:
        """Whether products run in 16 bits: 16-bit weights, or fp32 weights under autocast."""
        return self.model.weights_in_16_bits or self.distributed.mixed_precision != "no"

    def computes_in_bf16(self) -> bool:
        """Whether products run in bf16: bf16 weights, or bf16 autocast."""
        return self.model.dtype in ("bfloat16", "bf16") or self.distributed.mixed_precision == "bf16"

    def to_yaml(self) -> str:
        """The fully resolved recipe, as a run freezes it; it validates again as is (tested for every
        shipped recipe). `model.tiny` is left out unless the model is the tiny one it shapes."""
        data = self.model_dump(mode="json")
        if self.model.name_or_path != TINY_MODEL_NAME:
            del data["model"]["tiny"]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def section_type(annotation):
    """The Section class inside an annotation (`X`, `list[X]`, `X | None`, `Literal | X`), if any."""
    for c in (annotation, *getattr(annotation, "__args__", ())):
        for inner in (c, *getattr(c, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None
