"""Recipe sections for how a run goes: `train`, `distributed` (DeepSpeed, FSDP), `eval`, `export`, `output`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

BENCHMARK_TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy")  # the one list (evaluate.harness)

class TrainSection(Section):
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    epochs: int | None = Field(None, ge=1, le=100_000, description="Passes over the training data; null means 1 unless max_steps is set.")
    max_steps: int | None = Field(None, ge=1, le=1_000_000_000, description="Optimizer steps to run; replaces `epochs`.")
    batch_size: int = Field(8, ge=1, le=65536, description="Rows per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="`adamw`: moments in the trainable weights' dtype (torch's fused AdamW, or Kahan-compensated for "
        "16-bit weights). `adamw_8bit`: both moments held in 8 bits (bitsandbytes' blockwise dynamic quantization, "
        "256 values a block), 16-bit weights still Kahan-compensated: about 8 bytes a parameter for bf16 full "
        "fine-tuning instead of 10. `single` and `ddp` runs.",
    )
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
    save_every: int | None = Field(None, ge=1, description="Save a checkpoint every N steps (and at the end).")
    checkpoint_at_end: bool = Field(
        True,
        description="Save a checkpoint after the last step, besides final/. false: final/ only, for benchmarks and "
        "throwaway runs where a checkpoint's optimizer state would not fit the disk (GPT-J-6B full fine-tuning: "
        "~48 GB); a stop signal still saves one. Off, a final save that fails (a full disk) loses the steps "
        "since the last checkpoint; on, `--resume` saves final/ from this checkpoint without training again.",
    )
    keep_last: int = Field(2, ge=1, le=100_000, description="Checkpoints to keep; older ones are deleted.")
    check_disk: bool = Field(
        True,
        description="Before training, refuse a run whose checkpoints (keep_last + 1 at once) and final/ do not fit the "
        "free space of output.dir, and check again before each save. false: only a save that fails is reported.",
    )
    loss: Literal["fused", "plain"] = Field(
        "fused",
        description="`fused`: cross-entropy over target tokens only, computed with its gradient a chunk at a time "
        "(no full fp32 logits). `plain`: full logits, then cross-entropy (the reference).",
    )
    loss_chunk_tokens: int = Field(2048, ge=1, le=1 << 24, description="Tokens per chunk of the fused loss (memory: chunk x vocab x 4 bytes).")
    keep_freed_memory: bool = Field(
        True,
        description="On CPU, keep memory the loop frees for reuse instead of handing it back to the OS each step "
        "(glibc only): about 10% faster full fine-tuning with a 50400-row vocabulary, for more resident memory.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="Compile each transformer block's training forward with torch.compile (regional: the blocks "
        "share one compiled graph, built in the first steps, ~30 s for GPT-J-6B on an H200). Evaluation and "
        "generation stay eager. `auto`: on a CUDA GPU with Triton, single-process or ddp (there it cut a 6B LoRA "
        "step by a quarter), not for bf16 on GPUs older than Ampere (T4, V100); off on CPUs, where compiling "
        "takes longer than short runs gain. `true` also on a CPU (needs a C++ compiler); DeepSpeed and FSDP runs "
        "only take false or auto.",
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
    num_processes: int = Field(1, ge=1, le=4096, description="Processes per machine (one per GPU).")
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
        "later) or AVX-512 bf16 (AMD Zen 4) `bf16` multiplies in bf16 on fp32 weights: 1.3-1.7x faster for models "
        "256+ wide (the setup prints a tip where it pays); on CPUs with neither bf16 is emulated and much slower: "
        "keep `no`.",
    )
    timeout_minutes: float = Field(
        60, gt=0, le=10_080, description="How long a collective may wait before the job fails: a hung or stopped rank "
        "ends the job after this long, and the error names it (fractions allowed: 0.5 is 30 s).",
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
        if self.backend == "ddp" and self.num_processes * self.num_machines == 1:
            problems.append("backend ddp needs 2 or more processes (num_processes x num_machines); for one process "
                            "set backend to single")  # fmt: skip
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
    tasks: list[Literal[BENCHMARK_TASKS]] = Field(
        default_factory=lambda: list(BENCHMARK_TASKS),
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


TRACKERS = ("tensorboard", "mlflow", "wandb")


class LoggingSection(Section):
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that get every metrics line, the recipe as hyperparameters and the run's "
        "plots, from rank 0. Offline first: TensorBoard and MLflow write under the run directory (MLflow to "
        "MLFLOW_TRACKING_URI when set), W&B runs offline unless WANDB_MODE or WANDB_API_KEY says otherwise. "
        "Needs `pip install 'gptj-tune[trackers]'`.",
    )
    project: str = Field("gptj-tune", min_length=1, description="The MLflow experiment and W&B project the run goes in.")
    run_name: str | None = Field(
        None, min_length=1, description="The run's name in MLflow and W&B; null: the run directory's name."
    )
    tags: list[str] = Field(
        default_factory=list, description="Labels for the run: W&B tags, MLflow tags (each a key with an empty value). "
        "TensorBoard has none.",
    )
    entity: str | None = Field(
        None, min_length=1, description="W&B: the team or user the run goes under; null: WANDB_ENTITY, else your default."
    )

    @model_validator(mode="after")
    def _check_unique(self):
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError("logging.trackers names a tracker twice; list each once")
        if bad := [t for t in self.tags if not t.strip() or len(t) > 64]:
            raise ValueError(f"logging.tags: {bad[0]!r} is {'empty' if not bad[0].strip() else 'longer than 64 characters'} "
                             f"(W&B's limit); give short labels")  # fmt: skip
        if len(set(self.tags)) != len(self.tags):
            raise ValueError("logging.tags names a tag twice; list each once")
        return self
