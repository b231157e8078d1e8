"""The Recipe: one strict, typed, read-only description of a fine-tuning run.

Loaded from YAML (safe loader only) plus `--set key=value` overrides. Every problem is reported at
once, each naming the dotted key, the file line, the bad value, what is allowed and the fix.
"""

from __future__ import annotations

import difflib
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

TINY_MODEL_NAME = "tiny-gptj"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- model


class TinyModelSection(Section):
    layers: int = Field(4, ge=1, description="Transformer blocks of the built-in tiny GPT-J.")
    width: int = Field(128, ge=8, description="Hidden size (d_model) of the tiny GPT-J.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide `width`.")
    rotary_dim: int = Field(16, ge=2, description="Rotary dimensions per head (GPT-J-6B uses 64 of 256).")
    vocab_size: int = Field(
        512,
        ge=260,
        description="Size of the byte-level BPE our code trains on the demo data. Ignored when "
        "`model.tokenizer` names a tokenizer; the embedding then has GPT-J's padded size.",
    )
    context: int = Field(512, ge=16, description="Maximum positions (n_positions).")
    init_std: float = Field(
        0.1,
        gt=0,
        description="Std of the seeded normal init. Larger than GPT-J's 0.02 so that a LoRA on a frozen "
        "random head can still express confident predictions.",
    )
    seed: int = Field(0, description="Seed of the weight init: the same seed builds the same model.")

    @model_validator(mode="after")
    def _check_shapes(self):
        if self.width % self.heads:
            raise ValueError(f"model.tiny.width ({self.width}) must be divisible by model.tiny.heads ({self.heads})")
        head_dim = self.width // self.heads
        if self.rotary_dim > head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"model.tiny.rotary_dim ({self.rotary_dim}) must be even and at most the head size "
                f"width/heads = {head_dim}"
            )
        return self


class ModelSection(Section):
    name_or_path: str = Field(
        TINY_MODEL_NAME,
        description=f"Hub id (e.g. `EleutherAI/gpt-j-6b`) or local directory, loaded with `from_pretrained`; "
        f"`{TINY_MODEL_NAME}` builds the small built-in GPT-J offline.",
    )
    revision: str | None = Field(None, description="Hub revision, e.g. `float16` for GPT-J-6B's half-precision branch.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id or directory; defaults to `name_or_path`. With `tiny-gptj`, setting it "
        "builds the tiny model around that tokenizer instead of training one.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = Field(
        "float32",
        description="Weight dtype. On a CPU keep float32 weights (16-bit weights there lose precision in every "
        "update); for bf16 speed on CPUs with AMX use distributed.mixed_precision: bf16.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. `sdpa`: torch's fused attention (gptj-tune's own for GPT-J, which "
        "transformers lacks, and on a GPU packed rows in one call of torch's variable-length FlashAttention; "
        "transformers' for models that have it). `eager`: transformers' reference. `flash_attention_2`: the "
        "flash-attn package (GPU): for GPT-J gptj-tune's attention with flash-attn's variable-length kernel; for "
        "other models transformers', which mixes packed examples, so it needs data.packing: false. "
        "`auto`: sdpa where the model has it, else eager.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run. Off unless set.")
    tiny: TinyModelSection = Field(default_factory=TinyModelSection, description="Shape of the built-in tiny GPT-J.")

    @model_validator(mode="after")
    def _tiny_only_for_tiny(self):
        # (a tiny section equal to the defaults changes nothing: frozen recipes of earlier versions held one)
        if "tiny" in self.model_fields_set and self.name_or_path != TINY_MODEL_NAME and self.tiny != TinyModelSection():
            raise ValueError(
                f"model.tiny only shapes the built-in `{TINY_MODEL_NAME}`, but model.name_or_path is "
                f"{self.name_or_path!r}; remove model.tiny or set name_or_path: {TINY_MODEL_NAME}"
            )
        return self

    @property
    def weights_in_16_bits(self) -> bool:
        return self.dtype in ("bfloat16", "bf16", "float16", "fp16")


# -------------------------------------------------------------------------------------- method


class FullMethod(Section):
    kind: Literal["full"] = Field(description="Train every weight.")


class LoraMethod(Section):
    kind: Literal["lora"] = Field(description="Low-rank adapters (peft) on frozen base weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt. Default for GPT-J: q_proj, k_proj, v_proj, out_proj, fc_in, fc_out "
        "(GPT-Neo: q_proj, k_proj, v_proj, out_proj, c_fc, c_proj). `all-linear`: every linear layer but the head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapters (e.g. `lm_head`)."
    )


class PromptTuningMethod(Section):
    kind: Literal["prompt_tuning"] = Field(
        description="A soft prompt: learned input vectors placed before every example, on a frozen model."
    )
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Length of the soft prompt, in token positions.")
    init_text: str | None = Field(
        None,
        description="Start the prompt from this text's token embeddings (repeated to fill the length); null: from "
        "the embeddings of vocabulary tokens drawn at random (seeded by train.seed).",
    )


Method = Annotated[Union[FullMethod, LoraMethod, PromptTuningMethod], Field(discriminator="kind")]
METHOD_TYPES = {"full": FullMethod, "lora": LoraMethod, "prompt_tuning": PromptTuningMethod}


# ---------------------------------------------------------------------------------------- data


class SourceSection(Section):
    format: Literal["alpaca", "dolly", "text", "jsonl", "synthetic"] = Field(
        description="alpaca: instruction/input/output (JSON array or JSONL). dolly: instruction/context/"
        "response/category. text: .txt files or JSONL `text_field`, documents joined with EOS and cut into "
        "blocks. jsonl: any JSONL with `prompt_field`/`response_field`. synthetic: our generated demo tasks."
    )
    path: str | None = Field(
        None,
        description="Local file or folder, or a hub dataset id (e.g. `tatsu-lab/alpaca`) loaded with `datasets`. "
        "Relative paths are relative to the recipe file. Not used by `synthetic`.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    weight: float = Field(1.0, gt=0, description="Sampling weight in the training mix: 2 repeats the source, 0.5 halves it.")
    limit: int | None = Field(None, ge=1, description="Read only the first N records.")
    prompt_field: str | None = Field(None, description="jsonl: field holding the prompt (instruction).")
    input_field: str | None = Field(None, description="jsonl: optional field holding extra input/context.")
    response_field: str | None = Field(None, description="jsonl: field holding the response.")
    text_field: str = Field("text", description="text: field of a JSONL file holding the document.")
    count: int | None = Field(None, ge=10, description="synthetic: number of records to generate (default 4000).")
    tasks: list[str] | None = Field(
        None, description="synthetic: tasks to generate (reverse, sort, upper, count, last); default all."
    )
    seed: int = Field(0, description="synthetic: generation seed.")

    @model_validator(mode="after")
    def _check_format_fields(self):
        problems = []
        if self.format == "synthetic":
            if self.path is not None:
                problems.append("`path` is not used with format synthetic; remove it")
        elif self.path is None:
            problems.append(f"`path` is required for format {self.format}: a local file/folder or a hub dataset id")
        if self.format != "synthetic":
            problems += [f"`{k}` only applies to format synthetic" for k in ("count", "tasks") if getattr(self, k) is not None]
        if self.format == "jsonl":
            problems += [f"format jsonl needs `{k}`" for k in ("prompt_field", "response_field") if getattr(self, k) is None]
        else:
            problems += [
                f"`{k}` only applies to format jsonl"
                for k in ("prompt_field", "input_field", "response_field")
                if getattr(self, k) is not None
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CustomTemplate(Section):
    prompt: str = Field(description="Prompt text with `{instruction}`; the response follows it directly.")
    prompt_with_input: str | None = Field(
        None, description="Prompt used when a record has input, with `{instruction}` and `{input}`."
    )
    response_suffix: str = Field("", description="Text appended after the response, before EOS (e.g. `\\n\\n### End`).")

    @model_validator(mode="after")
    def _check_placeholders(self):
        for key, text, allowed in (
            ("prompt", self.prompt, {"instruction"}),
            ("prompt_with_input", self.prompt_with_input, {"instruction", "input"}),
        ):
            if text is None:
                continue
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as e:
                raise ValueError(f"data.template.{key} is not a valid template ({e}); write literal braces as {{{{ }}}}")
            if names - allowed or "instruction" not in names:
                raise ValueError(
                    f"data.template.{key} may use only {sorted(allowed)} placeholders and must use {{instruction}}; "
                    f"found {sorted(names)}"
                )
        return self


class DataSection(Section):
    sources: list[SourceSection] = Field(
        default_factory=lambda: [SourceSection(format="synthetic")],
        min_length=1,
        description="Datasets to mix. Each item: format, path and options.",
    )
    template: Literal["alpaca", "dolly", "plain"] | CustomTemplate = Field(
        "alpaca", description="Prompt template: alpaca, dolly, plain, or {prompt, prompt_with_input, response_suffix}."
    )
    max_length: int = Field(512, ge=8, description="Tokens per training sequence (and per packed block).")
    packing: bool = Field(
        True,
        description="Pack several examples into each max_length row; positions restart per example and no token "
        "attends across an example boundary. false: one example per row, padded.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_length (the count is printed)."
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of records held out for evaluation.")
    eval_max: int = Field(1000, ge=0, description="At most this many held-out records.")
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail", description="A malformed record: fail with file and line, or skip it and print the count."
    )


# --------------------------------------------------------------------------------------- train


class TrainSection(Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    epochs: int | None = Field(None, ge=1, description="Passes over the training data; null means 1 unless max_steps is set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; replaces `epochs`.")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    kahan_summation: bool = Field(
        True,
        description="Where trainable weights are held in 16 bits (full fine-tuning with model.dtype bfloat16/float16 "
        "on `single` or `ddp`), give each a 16-bit compensation buffer that keeps what rounding drops, so small "
        "updates add up (plain AdamW on bf16 weights rounds an update of lr 2e-5 to nothing for most of GPT-J's "
        "weights). 2 bytes per trainable parameter. DeepSpeed keeps fp32 master weights itself; FSDP: use "
        "model.dtype float32 with distributed.mixed_precision bf16.",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps (or use warmup_ratio).")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps (default 0.03).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    seed: int = Field(42, description="Seed for data order, dropout and adapter init.")
    log_every: int = Field(10, ge=1, description="Print a log line every N steps (metrics.jsonl gets every step).")
    save_every: int | None = Field(None, ge=1, description="Save a checkpoint every N steps (always at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints to keep; older ones are deleted.")
    loss: Literal["fused", "plain"] = Field(
        "fused",
        description="`fused`: cross-entropy over target tokens only, computed with its gradient a chunk at a time "
        "(no full fp32 logits). `plain`: full logits, then cross-entropy (the reference).",
    )
    loss_chunk_tokens: int = Field(2048, ge=1, description="Tokens per chunk of the fused loss (memory: chunk x vocab x 4 bytes).")
    keep_freed_memory: bool = Field(
        True,
        description="On CPU, keep memory the loop frees for reuse instead of handing it back to the OS each step "
        "(glibc only): about 10% faster full fine-tuning with a 50400-row vocabulary, for more resident memory.",
    )
    compile: bool = Field(
        False,
        description="Compile each transformer block's training forward with torch.compile (regional: the blocks "
        "share one compiled graph, built in the first steps). Evaluation and generation stay eager. Needs a C++ "
        "compiler on CPU, Triton on GPU; single-process and ddp runs only.",
    )

    @model_validator(mode="after")
    def _check_choices(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("can't set both train.warmup_steps and train.warmup_ratio; choose one")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("can't set both train.epochs and train.max_steps; choose one")
        return self


class DeepSpeedSection(Section):
    zero_stage: Literal[2, 3] = Field(
        3, description="ZeRO stage: 2 shards optimizer states and gradients; 3 also shards the weights."
    )
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Keep optimizer states in CPU memory.")
    offload_params: Literal["none", "cpu"] = Field("none", description="Keep weights in CPU memory (stage 3 only).")
    config: str | None = Field(
        None,
        description="Your own DeepSpeed JSON instead of the keys above; `auto` values are filled from the recipe "
        "(batch size, accumulation, clipping, precision). Relative to the recipe file.",
    )

    @model_validator(mode="after")
    def _check_offload(self):
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3 (stage 2 keeps weights on the device)")
        chosen = {"zero_stage", "offload_optimizer", "offload_params"} & self.model_fields_set
        if self.config is not None and chosen:
            raise ValueError(f"set either `config` or {', '.join(sorted(chosen))}, not both: the JSON decides those")
        return self


class FsdpSection(Section):
    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard",
        description="full_shard: weights, gradients and optimizer states sharded over every process (like ZeRO-3). "
        "shard_grad_op: weights stay gathered between forward and backward (like ZeRO-2, faster, more memory). "
        "hybrid_shard: shard within a machine, replicate across machines.",
    )
    cpu_offload: bool = Field(False, description="Keep sharded weights, gradients and optimizer states in CPU memory.")
    state_dict_type: Literal["sharded", "full"] = Field(
        "sharded",
        description="Checkpoints: `sharded` (each process writes its shard, torch.distributed.checkpoint) or `full` "
        "(gathered to the main process, written like a one-process checkpoint). final/ is always full.",
    )


class DistributedSection(Section):
    backend: Literal["single", "ddp", "deepspeed", "fsdp"] = Field(
        "single",
        description="single: one process. ddp: data parallel, a full copy per process. deepspeed: ZeRO-2/3 "
        "sharding (set `deepspeed`). fsdp: PyTorch FSDP2 (`fully_shard`), each GPT-J block a shard unit.",
    )
    num_processes: int = Field(1, ge=1, description="Processes per machine (one per GPU).")
    num_machines: int = Field(1, ge=1, description="Machines in the job; run the same command on each.")
    machine_rank: int = Field(0, ge=0, description="This machine's index, 0 to num_machines - 1.")
    main_process_ip: str = Field("127.0.0.1", description="Address of machine 0, reachable from every machine.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on machine 0.")
    hostfile: str | None = Field(
        None,
        description="deepspeed only: an MPI-style hostfile (`host slots=N` per line). DeepSpeed's launcher starts the "
        "workers of every listed machine (over ssh/pdsh): run the command once, on the first machine. Relative to "
        "the recipe file.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast precision; `no` trains in model.dtype. On a CPU with AMX (Intel Sapphire Rapids and "
        "later) `bf16` multiplies in bf16 on fp32 weights: 1.3-1.7x faster for models 256+ wide (the setup prints "
        "a tip where it pays); on CPUs without AMX bf16 is emulated and much slower: keep `no`.",
    )
    timeout_minutes: int = Field(
        60, ge=1, description="How long a collective may wait before the job fails (a hung peer ends the job)."
    )
    deepspeed: DeepSpeedSection | None = Field(
        None, description="DeepSpeed settings (backend deepspeed; defaults below when left out)."
    )

    fsdp: FsdpSection | None = Field(None, description="FSDP settings (backend fsdp; defaults below when left out).")

    @model_validator(mode="after")
    def _check_layout(self):
        problems = []
        if self.backend == "single" and self.num_processes * self.num_machines > 1:
            problems.append("backend single runs one process: set backend to ddp or deepspeed for more")
        if self.machine_rank >= self.num_machines:
            problems.append(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        if self.deepspeed is not None and self.backend != "deepspeed":
            problems.append("the `deepspeed` settings only apply to backend: deepspeed")
        if self.hostfile is not None and self.backend != "deepspeed":
            problems.append("`hostfile` is DeepSpeed's launcher: it needs backend deepspeed (else use num_machines/machine_rank)")
        if self.fsdp is not None and self.backend != "fsdp":
            problems.append("the `fsdp` settings only apply to backend: fsdp")
        if self.backend == "fsdp" and self.fsdp_settings.sharding == "hybrid_shard" and self.num_machines < 2:
            problems.append("fsdp.sharding hybrid_shard replicates across machines: it needs num_machines of 2 or more")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def fsdp_settings(self) -> FsdpSection:
        """The FSDP settings in force (defaults when the section is left out)."""
        return self.fsdp or FsdpSection()

    @property
    def zero(self) -> DeepSpeedSection:
        """The DeepSpeed settings in force (defaults when the section is left out)."""
        return self.deepspeed or DeepSpeedSection()


class EvalSection(Section):
    every_steps: int | None = Field(None, ge=1, description="Held-out loss every N steps (always at the end).")
    batch_size: int | None = Field(None, ge=1, description="Rows per eval batch; default train.batch_size.")
    generate_samples: int = Field(
        0, ge=0, description="At the end, greedy-generate this many held-out prompts and report exact match."
    )
    max_new_tokens: int = Field(64, ge=1, description="Generation limit for generate_samples.")
    tasks: list[Literal["lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy"]] = Field(
        default_factory=lambda: ["lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy"],
        description="Benchmarks `gptj-tune eval` runs on this run (lm-eval, local files).",
    )
    data_dir: str | None = Field(
        None, description="Folder with the benchmark files (layout of shared/data/benchmarks); relative to the recipe."
    )
    limit: int | None = Field(None, ge=1, description="Items per benchmark (default: all).")
    benchmark_every: int | None = Field(
        None, ge=1,
        description="Also run the benchmarks (tasks, limit, data_dir above) every N steps during training and at the "
        "end; results go to metrics.jsonl and the eval report. Needs data_dir; not under ZeRO-3/FSDP.",
    )

    @model_validator(mode="after")
    def _check_benchmarks(self):
        if self.benchmark_every is not None and self.data_dir is None:
            raise ValueError("eval.benchmark_every needs eval.data_dir (the folder with the benchmark files)")
        return self


class ExportSection(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of exported weights; auto: the training dtype (the base dtype for LoRA)."
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard written by `gptj-tune export`: a number and KB, MB, GB or TB.")

    @field_validator("max_shard_size")
    @classmethod
    def _check_shard_size(cls, value: str) -> str:
        return check_shard_size(value)


def check_shard_size(text: str, name: str = "") -> str:
    """A shard size as transformers' save_pretrained reads it (`5GB`, `500MB`); raises ValueError naming `name`."""
    import re

    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", text, flags=re.IGNORECASE):
        raise ValueError(f"{name + ' ' if name else ''}{text!r}: expected a size like 5GB or 500MB (units KB, MB, GB, TB)")
    return text


class OutputSection(Section):
    # No schema default: load_recipe fills it from the recipe's file name.
    dir: str = Field(
        description="Run directory. Default: runs/<recipe file name without .yaml>.",
        json_schema_extra={"shown_default": "`runs/<recipe stem>`"},
    )


class Recipe(Section):
    description: str = Field("", description="One line shown by `gptj-tune recipes`.")
    model: ModelSection = Field(default_factory=ModelSection, description="Base model and tokenizer.")
    method: Method = Field(default_factory=lambda: LoraMethod(kind="lora"), description="full, lora or prompt_tuning.")
    data: DataSection = Field(default_factory=DataSection, description="Datasets, template, packing.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimizer, schedule, steps, checkpoints.")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Processes and engine.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation during and after training.")
    export: ExportSection = Field(default_factory=ExportSection, description="Export defaults.")
    output: OutputSection = Field(description="Where the run directory goes.")

    @model_validator(mode="after")
    def _check_benchmarks_during_training(self):
        d = self.distributed
        sharded = d.backend == "fsdp" or (d.backend == "deepspeed" and d.zero.config is None and d.zero.zero_stage == 3)
        if self.eval.benchmark_every is not None and sharded:
            raise ValueError(
                "eval.benchmark_every needs the whole model on one process, which ZeRO-3/FSDP do not give; "
                "run `gptj-tune eval RUN` after training instead"
            )
        return self

    @model_validator(mode="after")
    def _check_tiny_context(self):
        if self.model.name_or_path == TINY_MODEL_NAME and self.data.max_length > self.model.tiny.context:
            raise ValueError(
                f"data.max_length {self.data.max_length} is longer than the tiny model's context (model.tiny.context "
                f"{self.model.tiny.context}): lower data.max_length or raise model.tiny.context"
            )
        return self

    @model_validator(mode="after")
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

    @model_validator(mode="after")
    def _check_compile(self):
        if self.train.compile and self.distributed.backend in ("deepspeed", "fsdp"):
            raise ValueError(
                f"train.compile works with distributed.backend single or ddp, not {self.distributed.backend} "
                "(its weight gathering runs inside the blocks); set train.compile: false"
            )
        return self

    @model_validator(mode="after")
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

    def to_yaml(self) -> str:
        """The fully resolved recipe, as a run freezes it; it validates again as is (tested for every
        shipped recipe). `model.tiny` is left out unless the model is the tiny one it shapes."""
        data = self.model_dump(mode="json")
        if self.model.name_or_path != TINY_MODEL_NAME:
            del data["model"]["tiny"]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------- loading


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line, for error messages."""
    index: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (key_node.value,)
                index[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return index


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-tag element (`method.lora.r` -> `method.r`)."""
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_TYPES:
        return (loc[0],) + loc[2:]
    return loc


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(raw_loc: tuple) -> list[str]:
    """Keys allowed at the parent of `raw_loc` (pydantic's loc, union tag included)."""
    model: Any = Recipe
    parts = list(raw_loc[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        if part == "method" and parts and parts[0] in METHOD_TYPES:
            model = METHOD_TYPES[parts.pop(0)]
            continue
        field = model.model_fields.get(part)
        model = _section_type(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _section_type(annotation):
    """The Section class inside an annotation (`X`, `list[X]`, `X | None`, `Literal | X`), if any."""
    for c in (annotation, *getattr(annotation, "__args__", ())):
        for inner in (c, *getattr(c, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _describe(err: dict, lines: dict[tuple, int], overrides: set[tuple]) -> str:
    loc = _clean_loc(tuple(err["loc"]))
    kind = err["type"]
    if kind == "union_tag_invalid":
        loc += ("kind",)
    key = _dotted(loc) or "(top level)"
    where = ""
    for n in range(len(loc), -1, -1):
        if loc[:n] in overrides:
            where = " (from --set)"
            break
        if loc[:n] in lines:
            where = f" (line {lines[loc[:n]]})"
            break
    if kind == "extra_forbidden":
        allowed = _allowed_keys(tuple(err["loc"]))
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{guess[0]}`?" if guess else f"allowed keys: {', '.join(allowed)}"
        return f"`{key}`{where}: unknown key; {hint}"
    if kind == "missing":
        return f"`{key}`{where}: required but missing"
    if kind == "union_tag_invalid":
        return f"`{key}`{where}: got {err['input'].get('kind')!r}; expected one of 'full', 'lora', 'prompt_tuning'"
    if kind == "union_tag_not_found":
        return f"`{key}`{where}: needs `kind: full`, `kind: lora` or `kind: prompt_tuning`"
    msg = err["msg"].removeprefix("Value error, ")
    if kind.startswith(("value_error", "assertion_error")):
        return f"`{key}`{where}: {msg}"
    return f"`{key}`{where}: {msg}; got {err['input']!r}"


def parse_override(text: str) -> tuple[tuple, Any]:
    """`train.lr=1e-4` -> (('train', 'lr'), 0.0001). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4"])
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError([f"--set {text!r}: the key has an empty part; write dotted keys like train.lr or data.sources.0.path"])
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError([f"--set {text!r}: value is not valid YAML ({e.problem})"])
    return path, value


def _apply_override(raw: dict, path: tuple, value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, dict):
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        elif _list_index(node, part, path, i):
            if part == len(node):  # one past the end adds an entry: data.sources.1.format=text
                node.append([] if isinstance(nxt, int) else {})
            node = node[part]
        else:
            raise RecipeError([f"--set {_dotted(path)}: `{_dotted(path[: i + 1])}` is not a section that can be indexed"])
    last = path[-1]
    if _list_index(node, last, path, len(path) - 1):
        node[last:last + 1] = [value]
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError([f"--set {_dotted(path)}: cannot set this key"])


def _list_index(node: Any, part: Any, path: tuple, i: int) -> bool:
    """Whether `part` indexes the list `node` (0 to its length, which adds an entry); an index further
    out is an error giving the length."""
    if not (isinstance(node, list) and isinstance(part, int)):
        return False
    if part > len(node):
        n = len(node)
        raise RecipeError([f"--set {_dotted(path)}: `{_dotted(path[:i])}` has {n} entr{'y' if n == 1 else 'ies'}, so "
                           f"index {part} is past its end; use 0 to {n} ({n} adds one)"])  # fmt: skip
    return True


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"{path} is a folder; give a recipe file (YAML), or a shipped recipe's name (`gptj-tune recipes`)"])
    if not path.is_file():
        raise RecipeError([f"file not found: {path}; list shipped recipes with `gptj-tune recipes`"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.start}): a recipe is a YAML file"], source=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError([f"{line}not valid YAML: {getattr(e, 'problem', e)}"], source=str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source=str(path))
    parsed = [parse_override(o) for o in overrides]
    for key_path, value in parsed:
        _apply_override(raw, key_path, value)
    output = raw.setdefault("output", {})
    if isinstance(output, dict):
        output.setdefault("dir", f"runs/{path.stem}")
    _resolve_source_paths(raw, path.parent)
    return validate_recipe(raw, source=str(path), lines=_line_index(text), overrides={p for p, _ in parsed})


def _resolve_source_paths(raw: dict, base: Path) -> None:
    """Relative local paths (data, DeepSpeed JSON) are relative to the recipe file, like an import in code."""
    sources = raw.get("data", {}).get("sources") if isinstance(raw.get("data"), dict) else None
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            candidate = base / source["path"]
            if not Path(source["path"]).is_absolute() and candidate.exists():
                source["path"] = str(candidate.resolve())
            elif Path(source["path"]).exists():  # relative to where the command runs (a --set value)
                source["path"] = str(Path(source["path"]).resolve())
    # A local model or tokenizer folder is relative to where the command runs, as from_pretrained reads
    # it; frozen as an absolute path, so the run's export, eval and generate work from anywhere.
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    for key in ("name_or_path", "tokenizer"):
        value = model.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).is_dir():
            model[key] = str(Path(value).resolve())
    dist = raw.get("distributed") if isinstance(raw.get("distributed"), dict) else {}
    ds = dist.get("deepspeed")
    if isinstance(ds, dict) and isinstance(ds.get("config"), str) and not Path(ds["config"]).is_absolute():
        ds["config"] = str((base / ds["config"]).resolve())
    if isinstance(dist.get("hostfile"), str) and not Path(dist["hostfile"]).is_absolute():
        dist["hostfile"] = str((base / dist["hostfile"]).resolve())
    ev = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    if isinstance(ev.get("data_dir"), str) and not Path(ev["data_dir"]).is_absolute():
        ev["data_dir"] = str((base / ev["data_dir"]).resolve())


def validate_recipe(raw: dict, source: str | None = None, lines=None, overrides=frozenset()) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, lines or {}, set(overrides)) for err in e.errors()]
        raise RecipeError(problems, source=source) from None


# ----------------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """The recipe reference in README.md, generated from the schema's field descriptions."""
    out = ["| key | default | description |", "| --- | --- | --- |"]

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _section_type(field.annotation) if name != "method" else None
            if name == "method":
                out.append("| `method.kind` | `lora` | `full` (train every weight), `lora` (peft adapters) or "
                           "`prompt_tuning` (a soft prompt) |")
                walk_fields(LoraMethod, "method.", skip={"kind"}, note=" (lora)")
                walk_fields(PromptTuningMethod, "method.", skip={"kind"}, note=" (prompt_tuning)")
                continue
            if sub is not None and name not in ("sources", "template"):
                walk(sub, f"{key}.")
                continue
            if name == "sources":
                out.append(row(key + "[]", field))
                walk(SourceSection, f"{key}[].")
                continue
            out.append(row(key, field))

    def walk_fields(model, prefix, skip=(), note=""):
        for name, field in model.model_fields.items():
            if name not in skip:
                out.append(row(f"{prefix}{name}", field, note))

    def row(key, field, note=""):
        shown = (field.json_schema_extra or {}).get("shown_default")
        if shown:
            default = shown
        elif field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "see below" if key.endswith("[]") else f"`{field.default_factory()}`"
        else:
            default = f"`{field.default}`" if field.default is not None else "null"
        return f"| `{key}` | {default} | {field.description or ''}{note} |"

    walk(Recipe, "")
    return "\n".join(out) + "\n"
