"""The engines the throughput benchmark races, each run in a worker process of its own: gptj-tune
(recipe defaults), TRL's SFTTrainer (defaults, and at its best for the device) and the HF Trainer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from workload import LORA, LORA_TARGETS, family, held_out_loss, peak_memory, tokenize


def run_ours(spec: dict, out: Path, after_each_step=None) -> dict:
    from rich.console import Console

    from gptj_tune.recipe import Recipe
    from gptj_tune.train.loop import train

    recipe = Recipe.model_validate({
        "model": {"name_or_path": spec["model"], "tokenizer": spec["tokenizer"], "dtype": spec["dtype"]},
        "method": {"kind": spec["method"], **LORA} if spec["method"] in ("lora", "qlora") else {"kind": "full"},
        "data": {"sources": [{"format": "alpaca", "path": spec["alpaca"], "limit": spec["records"]}],
                 "template": "alpaca", "max_length": spec["max_length"], "eval_fraction": 0.0, "on_bad_record": "skip"},
        "train": {"lr": spec["lr"], "epochs": 1, "batch_size": spec["packed_batch_size"], "warmup_ratio": 0.03,
                  "schedule": "cosine", "seed": spec["seed"], "log_every": 10,
                  "checkpoint_at_end": False, "compile": spec.get("compile", "auto")},  # final/ only: a 6B full checkpoint (~48 GB) would fill the disk
        "distributed": {"mixed_precision": spec["mixed_precision"]},
        "eval": {"generate_samples": 0},
        "output": {"dir": str(out / "run")},
    })  # fmt: skip
    from gptj_tune.plan import GIB, plan

    planned = plan(recipe)  # `gptj-tune plan`'s figure for this run, beside the measured peak
    planned_gib = planned.own_estimate.total / GIB
    result = train(recipe, console=Console(stderr=True), after_each_step=after_each_step)
    model = _load_final(out / "run" / "final", spec)
    marks = step_marks(out / "run")
    return {"seconds": result.seconds, "real_tokens": result.tokens, "slots": result.slots, "model": model, "steps": result.steps,
            "marks": marks, "plan_gib": planned_gib,
            "attention": "gptj-tune SDPA (per packed example on a CPU, variable-length on a GPU)"}  # fmt: skip


def _load_final(final: Path, spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        if spec["method"] == "qlora":  # scored on the 4-bit base it trained on
            quantized = AutoModelForCausalLM.from_pretrained(spec["model"], **_quantized(spec, dtype))
            return PeftModel.from_pretrained(quantized, final)
        base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
        return PeftModel.from_pretrained(base, final, is_trainable=True).to(spec["device"])
    return AutoModelForCausalLM.from_pretrained(final, dtype=dtype).to(spec["device"])


def _step_marks(trainer, counting) -> list:
    """[seconds since training began, real tokens of the steps so far] at the end of every step, for
    the steady rate after the first steps: a step's tokens are its batch's (one batch a step, no
    accumulation), counted by the collator, which runs ahead of the steps."""
    import time

    from transformers import TrainerCallback

    marks, began = [], []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            began.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append([time.perf_counter() - began[0], sum(counting.per_batch[: state.global_step])])

    trainer.add_callback(Marks())
    return marks


class CountingCollator:
    """Wraps a collator and counts the token slots it hands out and the real tokens in them."""

    def __init__(self, inner):
        self.inner, self.slots, self.real, self.per_batch = inner, 0, 0, []

    def __call__(self, features):
        batch = self.inner(features)
        self.slots += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.per_batch.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        self.real += self.per_batch[-1]
        return batch


def _training_args(spec: dict, out: Path, **overrides) -> dict:
    args = dict(
        output_dir=str(out / "hf"), per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none", seed=spec["seed"],
        use_cpu=spec["device"] == "cpu", disable_tqdm=True,
    )  # fmt: skip
    args.update(overrides)
    return args


def _quantized(spec: dict, dtype) -> dict:
    """from_pretrained's arguments for the 4-bit base every engine's qlora run gets: gptj-tune's own
    settings (NF4, double quantization, products in the model's dtype), as a TRL user sets them."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)  # fmt: skip
    return {"dtype": dtype, "quantization_config": config, "device_map": {"": 0 if spec["device"] == "cuda" else "cpu"}}


def _base_model(spec: dict, full_precision: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if spec["method"] == "qlora":
        return AutoModelForCausalLM.from_pretrained(spec["model"], **_quantized(spec, torch.float32 if spec["device"] == "cpu" else torch.bfloat16))
    dtype = torch.float32 if full_precision or spec["device"] == "cpu" else torch.bfloat16
    # transformers' default attention, as a TRL or Trainer user gets it: for GPT-J eager before
    # transformers 5.24 (its only other one was FlashAttention-2), its own SDPA from 5.24 on
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)


def _lora_config(shape: str = "tiny"):
    """The adapters every engine trains: gptj-tune's defaults for the shape's family."""
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA_TARGETS[family(shape)],
                      task_type="CAUSAL_LM")  # fmt: skip


def run_trl(spec: dict, out: Path, best: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, examples = tokenize(spec, 0, spec["records"])
    data = Dataset.from_list([
        {"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]} for e in examples
    ])  # fmt: skip
    settings = dict(max_length=spec["max_length"], dataset_num_proc=None)
    if best:  # what a careful user sets: packing, no recomputation, fp32 on a CPU (TRL ran slower in bf16, even on an AMX CPU)
        on_cpu = spec["device"] == "cpu"
        settings.update(packing=True, gradient_checkpointing=False, bf16=not on_cpu, fp16=False)
    batch = {"per_device_train_batch_size": spec["packed_batch_size"]} if best else {}
    config = SFTConfig(**_training_args(spec, out, **batch), **settings)
    model = _base_model(spec, full_precision=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=_lora_config(spec["shape"]) if spec["method"] in ("lora", "qlora") else None)  # fmt: skip
    trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    marks = _step_marks(trainer, counting)
    metrics = trainer.train().metrics
    return {"seconds": metrics["train_runtime"], "real_tokens": counting.real, "slots": counting.slots, "marks": marks,
            "model": trainer.model, "steps": trainer.state.global_step, "attention": model.config._attn_implementation}  # fmt: skip


def run_hf_trainer(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok, examples = tokenize(spec, 0, spec["records"])
    data = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
                              for e in examples])  # fmt: skip
    model = _base_model(spec, full_precision=False)
    if spec["method"] in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(spec["shape"]))
    counting = CountingCollator(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    args = TrainingArguments(**_training_args(spec, out, bf16=spec["device"] == "cuda"))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting)
    marks = _step_marks(trainer, counting)
    metrics = trainer.train().metrics
    return {"seconds": metrics["train_runtime"], "real_tokens": counting.real, "slots": counting.slots, "marks": marks,
            "model": trainer.model, "steps": trainer.state.global_step, "attention": model.config._attn_implementation}  # fmt: skip


def step_marks(run_dir: Path) -> list:
    """[elapsed seconds, real tokens so far] at each logged step of a gptj-tune run (its metrics.jsonl)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["elapsed_s"], r["tokens"]] for r in lines if "tokens" in r and "elapsed_s" in r]


def steady_rate(marks: list, warmup: int) -> float | None:
    """Real tokens per second from the end of step `warmup` to the last step's: the steady rate,
    without start-up, first-step allocations and compilation (None with too few steps after it)."""
    if len(marks) < warmup + 2:
        return None
    (t0, n0), (t1, n1) = marks[warmup - 1] if warmup else (0.0, 0), marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def worker(engine: str, spec: dict, result_path: Path) -> None:
    import torch

    torch.manual_seed(spec["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if engine == "gptj-tune":
            r = run_ours(spec, out)
        elif engine in ("trl-default", "trl-best"):
            r = run_trl(spec, out, best=engine == "trl-best")
        else:
            r = run_hf_trainer(spec, out)
        model = r.pop("model")
        r["peak_memory_gib"] = peak_memory(spec["device"])
        r["held_out_loss"] = held_out_loss(model, spec, next(model.parameters()).device)
        r["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r["params"] = sum(p.numel() for p in model.parameters())
    r["end_to_end_tokens_per_s"] = r["real_tokens"] / r["seconds"]
    r["tokens_per_s"] = steady_rate(r.pop("marks"), spec.get("warmup_steps", 5)) or r["end_to_end_tokens_per_s"]
    r["padding_efficiency"] = r["real_tokens"] / r["slots"]
    result_path.write_text(json.dumps(r))
