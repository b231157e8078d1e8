"""Benchmark (not a test): training throughput of gptj-tune against TRL's SFTTrainer and HF Trainer
on the same work: the same model weights, Alpaca records, GPT-2 tokenizer, tokens, max_length,
batch size, learning-rate schedule and seed; one epoch, so every engine trains on the same real
(non-pad) tokens.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--shape tiny|small|gptj-6b]
        [--method lora|full] [--records 120 | --steps N] [--repeats 1] [--seed 0] [--out train_throughput.json]
        [--mixed-precision no|bf16]

Engines (each in its own process, so peak memory is its own; the order alternates per repeat):
  gptj-tune     our loop, recipe defaults (packing, SDPA attention, fused loss); --mixed-precision bf16
                sets distributed.mixed_precision (bf16 products on fp32 weights: on CPUs with AMX)
  trl-default   TRL SFTTrainer with its defaults (bf16 autocast, gradient checkpointing, padding)
  trl-best      TRL SFTTrainer at its best for the device (packing; on CPU fp32, no checkpointing)
  hf-trainer    transformers Trainer, padding collator (fp32 on CPU)

The packing engines (gptj-tune, trl-best) take as many full max_length rows per step as fit in
the padded engines' real tokens per step, rounded down (--packed-batch-size overrides): rows are
whole, so update counts cannot be equal; rounding down means no packing engine makes fewer
updates than the padded engines, or larger ones (fewer, larger updates would lose them loss at
an equal token budget). The steps column shows the counts.

Reported: real tokens/s, padding efficiency (real tokens / token slots computed), peak memory
(RSS on CPU, CUDA max allocated on GPU), the held-out loss after the budget (the same records and
the same loss code for every engine, so equal learning shows), ours / baseline tokens/s, the model
FLOP rate, and on a GPU the MFU (model FLOP rate / the GPU's dense bf16 peak).

Model FLOPs count the work the training needs, the same for every engine, whatever an engine
computes on top (padding, masked attention pairs, logits nobody scores): per real token
k * N_blocks (the blocks' weight matrices) + k * N_head * the share of tokens the loss scores
(prompt tokens need no logits) + 6 * N_lora (adapters) + 12 * layers * d_model * the mean causal
span (a token attends to its example's earlier tokens and itself), with k = 6 for full
fine-tuning (forward 2, input and weight gradients 2 each) and 4 for LoRA (frozen weights get no
weight gradient). The input embedding is a lookup: no FLOPs. This is below the common
"6N + attention over the whole row" count, which would credit every engine with the embedding's
and the unscored logits' FLOPs and with attention across packed examples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checks import require_at_least_one, require_device

REPO = Path(__file__).resolve().parent.parent
ENGINES = ["gptj-tune", "trl-default", "trl-best", "hf-trainer"]
SHAPES = {  # GPT-J configs; every shape keeps GPT-J's 50400-row embedding and head
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8),  # the 50400-wide head dominates
    "small": dict(n_layer=6, n_embd=512, n_head=8, rotary_dim=32),  # the blocks dominate
    "gptj-6b": dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64),
}
LORA = dict(r=16, alpha=32, dropout=0.05)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
HELD_OUT = 64  # records after the training records, scored the same way for every engine
# Dense bf16 peaks, by the first of these names found in torch.cuda.get_device_name() (SXM parts
# report e.g. "NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
VOCAB = 50400  # GPT-J's embedding and head rows, in every shape


# --------------------------------------------------------------------------------- the workload


def model_for(shape: str, folder: Path, console) -> Path:
    """The benchmark's random-init model of `shape` in `folder`: built there once, reused after
    (`--model-dir`: the GPT-J-6B shape is 12 GB and takes minutes to build). A folder holding
    another shape, or something else, is refused."""
    marker = folder / "benchmark-shape.json"
    if marker.is_file():
        built = json.loads(marker.read_text()).get("shape")
        if built != shape:
            raise SystemExit(f"--model-dir {folder} holds the {built} shape, not {shape}: choose another folder or delete it")
        console.print(f"reusing the {shape} model in {folder}")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"--model-dir {folder} is not empty and holds no benchmark model: choose an empty or new folder")
    console.print(f"building the {shape} model in {folder} ...")
    build_model(shape, folder)
    marker.write_text(json.dumps({"shape": shape, "config": SHAPES[shape]}))  # last: a half-built folder has none
    return folder


def build_model(shape: str, folder: Path) -> None:
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=VOCAB, n_positions=2048, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, **SHAPES[shape])
    torch.manual_seed(0)
    if shape == "gptj-6b":
        with torch.device("cuda"):
            model = GPTJForCausalLM(config).to(torch.bfloat16)
    else:
        model = GPTJForCausalLM(config)
    model.save_pretrained(folder)


def tokenize(spec: dict, first: int, count: int):
    """Alpaca records [first, first+count) through gptj-tune's own tokenizer path (prompt masked)."""
    from transformers import AutoTokenizer

    from gptj_tune.data.formats import read_source
    from gptj_tune.data.templates import BUILTIN_TEMPLATES
    from gptj_tune.data.tokens import tokenize_instructions
    from gptj_tune.recipe import SourceSection

    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tok.eos_token = tok.eos_token or "<|endoftext|>"  # GPT-2's files name none
    tok.pad_token = tok.eos_token
    source = SourceSection(format="alpaca", path=spec["alpaca"], limit=first + count)
    records = read_source(source, 0, "skip").records[first:]
    examples, _ = tokenize_instructions(records, tok, BUILTIN_TEMPLATES["alpaca"], spec["max_length"], False, "truncate")
    return tok, examples


def held_out_loss(model, spec: dict, device) -> float:
    """Mean target-token cross-entropy on the held-out records; plain padded batches, eager math."""
    import torch
    import torch.nn.functional as F

    tok, examples = tokenize(spec, spec["records"], HELD_OUT)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            chunk = examples[i : i + 8]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids)) for e in chunk], device=device)
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], device=device)
            mask = (torch.arange(width, device=device)[None] < torch.tensor([len(e.input_ids) for e in chunk], device=device)[:, None]).long()
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def peak_memory(device: str) -> float:
    """GiB: CUDA max allocated, or this process's peak RSS (VmHWM)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------- engines


def run_ours(spec: dict, out: Path, after_each_step=None) -> dict:
    from rich.console import Console

    from gptj_tune.recipe import Recipe
    from gptj_tune.train.loop import train

    recipe = Recipe.model_validate({
        "model": {"name_or_path": spec["model"], "tokenizer": spec["tokenizer"], "dtype": spec["dtype"]},
        "method": {"kind": "lora", **LORA} if spec["method"] == "lora" else {"kind": "full"},
        "data": {"sources": [{"format": "alpaca", "path": spec["alpaca"], "limit": spec["records"]}],
                 "template": "alpaca", "max_length": spec["max_length"], "eval_fraction": 0.0, "on_bad_record": "skip"},
        "train": {"lr": spec["lr"], "epochs": 1, "batch_size": spec["packed_batch_size"], "warmup_ratio": 0.03,
                  "schedule": "cosine", "seed": spec["seed"], "log_every": 10,
                  "checkpoint_at_end": False},  # final/ only: a 6B full checkpoint (~48 GB) would fill the disk
        "distributed": {"mixed_precision": spec["mixed_precision"]},
        "eval": {"generate_samples": 0},
        "output": {"dir": str(out / "run")},
    })  # fmt: skip
    result = train(recipe, console=Console(stderr=True), after_each_step=after_each_step)
    model = _load_final(out / "run" / "final", spec)
    return {"seconds": result.seconds, "real_tokens": result.tokens, "slots": result.slots, "model": model, "steps": result.steps,
            "attention": "gptj-tune SDPA (per packed example on a CPU, variable-length on a GPU)"}  # fmt: skip


def _load_final(final: Path, spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
        return PeftModel.from_pretrained(base, final, is_trainable=True).to(spec["device"])
    return AutoModelForCausalLM.from_pretrained(final, dtype=dtype).to(spec["device"])


class CountingCollator:
    """Wraps a collator and counts the token slots it hands out and the real tokens in them."""

    def __init__(self, inner):
        self.inner, self.slots, self.real = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.slots += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
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


def _base_model(spec: dict, full_precision: bool):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if full_precision or spec["device"] == "cpu" else torch.bfloat16
    # transformers' default attention, as a TRL or Trainer user gets it: for GPT-J eager before
    # transformers 5.24 (its only other one was FlashAttention-2), its own SDPA from 5.24 on
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA_TARGETS,
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
                         peft_config=_lora_config() if spec["method"] == "lora" else None)  # fmt: skip
    trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    metrics = trainer.train().metrics
    return {"seconds": metrics["train_runtime"], "real_tokens": counting.real, "slots": counting.slots,
            "model": trainer.model, "steps": trainer.state.global_step, "attention": model.config._attn_implementation}  # fmt: skip


def run_hf_trainer(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok, examples = tokenize(spec, 0, spec["records"])
    data = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
                              for e in examples])  # fmt: skip
    model = _base_model(spec, full_precision=False)
    if spec["method"] == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config())
    counting = CountingCollator(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    args = TrainingArguments(**_training_args(spec, out, bf16=spec["device"] == "cuda"))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting)
    metrics = trainer.train().metrics
    return {"seconds": metrics["train_runtime"], "real_tokens": counting.real, "slots": counting.slots,
            "model": trainer.model, "steps": trainer.state.global_step, "attention": model.config._attn_implementation}  # fmt: skip


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
    r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
    r["padding_efficiency"] = r["real_tokens"] / r["slots"]
    result_path.write_text(json.dumps(r))


# ----------------------------------------------------------------------------------------- main


def _matching_rows(spec: dict, examples) -> int:
    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    return max(1, math.floor(spec["batch_size"] * mean / spec["max_length"]))


def matmul_params(shape: str, method: str) -> dict[str, int]:
    """Weights that multiply tokens: the blocks' (q, k, v, out: d x d; fc_in, fc_out: d x 4d), the
    head's (vocab x d) and, for LoRA, the adapters' (rank r x (in + out) on each target)."""
    d, layers = SHAPES[shape]["n_embd"], SHAPES[shape]["n_layer"]
    adapters = LORA["r"] * layers * (4 * (d + d) + 2 * (d + 4 * d)) if method == "lora" else 0
    return {"blocks": 12 * d * d * layers, "head": VOCAB * d, "adapters": adapters}


def token_stats(examples) -> dict[str, float]:
    """Over the workload's real tokens: the share whose next token the loss scores, and the mean
    causal span (keys a token attends to: its position in its example, plus one)."""
    real = sum(len(e.input_ids) for e in examples)
    scored = sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)
    spans = sum(len(e.input_ids) * (len(e.input_ids) + 1) // 2 for e in examples)
    return {"scored_share": scored / real, "mean_span": spans / real}


def flops_per_token(spec: dict, stats: dict[str, float]) -> tuple[float, str]:
    """Model FLOPs per real training token, and the formula with its numbers (module docstring)."""
    shape, n = SHAPES[spec["shape"]], matmul_params(spec["shape"], spec["method"])
    k = 6 if spec["method"] == "full" else 4
    attention = 12 * shape["n_layer"] * shape["n_embd"] * stats["mean_span"]
    total = k * n["blocks"] + k * n["head"] * stats["scored_share"] + 6 * n["adapters"] + attention
    formula = (
        f"{k}*N_blocks + {k}*N_head*{stats['scored_share']:.3f} (scored share)"
        + (" + 6*N_lora" if n["adapters"] else "")
        + f" + 12*layers*d_model*{stats['mean_span']:.1f} (mean causal span) = {total / 1e9:.3g} GFLOP per token; "
        f"N_blocks {n['blocks']:,}, N_head {n['head']:,}" + (f", N_lora {n['adapters']:,}" if n["adapters"] else "")
    )
    return total, formula


# Two-line headers of fixed width, no outer edge: the whole table, MFU column included, fits an
# 80-column terminal (rich otherwise cuts headers and cells to "…" to fit).
COLUMNS = ("engine", "real\ntok/s", "ours/\nthis", "padding\neff.", "peak\nGiB", "held-out\nloss", "steps", "model\nTFLOP/s")


def results_table(title: str, rows: dict[str, dict], gpu: bool):
    """The results as a rich table: one row per engine (`rows` as written to the JSON's "engines")."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for col in COLUMNS + (("MFU",) if gpu else ()):
        width = max(len(line) for line in col.split("\n"))
        table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True, min_width=width)
    for e, r in rows.items():
        cells = [e, f"{r['tokens_per_s']:,.0f}", f"{r['ours_over_this']:.2f}x" if "ours_over_this" in r else "-",
                 f"{r['padding_efficiency']:.3f}", f"{r['peak_memory_gib']:.2f}", f"{r['held_out_loss']:.4f}", str(r["steps"]), f"{r['model_tflops']:.3g}"]  # fmt: skip
        if gpu:
            cells.append(f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-")
        table.add_row(*cells)
    return table


def results_plot(title: str, rows: dict[str, dict], path: Path, gpu: bool) -> bool:
    """The results as a PNG: real tokens/s per engine (each bar labelled with gptj-tune's multiple of
    it, and on a GPU the MFU), held-out loss and peak memory, one panel each. Written atomically: an
    earlier plot is replaced whole or not at all. False where matplotlib is not installed."""
    from gptj_tune.evaluate.render import pyplot
    from gptj_tune.rundir import atomic_write

    plt = pyplot()
    if plt is None:
        return False
    engines = list(rows)[::-1]  # top to bottom in the order they were asked for
    colours = ["tab:blue" if e == "gptj-tune" else "tab:gray" for e in engines]
    panels = [
        ("real tokens/s (higher is better)", "tokens_per_s",
         lambda r: f"{r['tokens_per_s']:,.0f}" + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "")
         + (f"  (gptj-tune {r['ours_over_this']:.1f}x)" if "ours_over_this" in r else "")),
        ("held-out loss (lower is better)", "held_out_loss", lambda r: f"{r['held_out_loss']:.4f}"),
        (f"peak memory, GiB ({'CUDA max allocated' if gpu else 'RSS'})", "peak_memory_gib", lambda r: f"{r['peak_memory_gib']:.2f}"),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 1.2 + 0.55 * len(engines)), sharey=True)
    for ax, (label, key, text) in zip(axes, panels, strict=True):
        values = [rows[e][key] for e in engines]
        low, top = min(values), max(values)
        if key == "held_out_loss":  # losses differ in the second decimal: dots on an axis near them, not bars from 0
            spread = max(top - low, 0.05)
            ax.set_xlim(low - spread, top + 1.5 * spread)
            ax.scatter(values, engines, color=colours, s=40, zorder=3)
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.set_xlim(0, top * 1.6)
            ax.barh(engines, values, color=colours)
        start, end = ax.get_xlim()
        for i, e in enumerate(engines):
            ax.text(values[i] + (end - start) * 0.02, i, text(rows[e]), va="center", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return True


def _versions() -> dict[str, str]:
    """The libraries every engine's speed depends on (transformers 5.24 gave GPT-J its own SDPA, for one)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--records", type=int, default=120, help="Alpaca records trained on (one epoch).")
    parser.add_argument("--steps", type=int, default=None,
                        help="The budget as the padded engines' optimizer steps: sets --records to steps x batch size.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--packed-batch-size", type=int, default=None,
                        help="Rows per step for the packing engines (default: the padded engines' tokens per step).")
    parser.add_argument("--lr", type=float, default=None, help="Default: 2e-4 for LoRA, 5e-5 for full.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per engine; the order alternates.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every engine (data order, dropout, adapter init).")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"Comma-separated subset of {ENGINES}.")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: torch's).")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="gptj-tune's distributed.mixed_precision (the recipe default is no). TRL's best setting on "
                             "a CPU stays fp32: with bf16 it ran slower here (341 vs 365 tok/s, small full).")
    parser.add_argument("--model-dir", default=None,
                        help="Build the random-init model here once and reuse it in later invocations (default: a temp "
                             "folder, deleted at the end). GPT-J-6B's shape is 12 GB.")
    parser.add_argument("--out", default="train_throughput.json",
                        help="The JSON; a PNG of the results is written beside it (same name, .png).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gptj_tune.cli import quiet_libraries

    quiet_libraries()  # no save progress bars or "no GPU" notices between the table's lines
    if args.worker:
        return worker(args.worker, json.loads(Path(args.spec).read_text()), Path(args.result))

    require_at_least_one(args, "steps", "batch_size", "packed_batch_size", "repeats", "threads")
    if args.steps:
        args.records = args.steps * args.batch_size
    if not 64 <= args.max_length <= 2048:
        raise SystemExit(f"--max-length {args.max_length}: use 64 to 2048 (GPT-J's context; the Alpaca template's "
                         f"prompt alone takes ~40 tokens, so shorter rows keep no response tokens to train on)")  # fmt: skip
    require_device(args.shape, args.device)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    data = Path(args.data_dir)
    if not (data / "alpaca" / "alpaca_data.json").exists():
        raise SystemExit(f"--data-dir: {data} has no alpaca/alpaca_data.json (the shared data folder)")
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        raise SystemExit(f"--out {out}: name the JSON (e.g. {out.with_suffix('.json')}); the plot is written beside it as .png")
    if not 0 < args.records <= 50_000:
        raise SystemExit(f"--records {args.records}: use 1 to 50,000 (Alpaca has 52,002; {HELD_OUT} later ones are held out)")

    from rich.console import Console

    console = Console()
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    failed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_for(args.shape, Path(args.model_dir) if args.model_dir else Path(tmp) / "model", console)
        spec = {
            "device": args.device, "shape": args.shape, "method": args.method, "records": args.records,
            "max_length": args.max_length, "batch_size": args.batch_size, "seed": args.seed,
            "lr": args.lr or (2e-4 if args.method == "lora" else 5e-5), "model": str(model_dir),
            "tokenizer": str(data / "gpt2-tokenizer"), "alpaca": str(data / "alpaca" / "alpaca_data.json"),
            "dtype": "bfloat16" if args.device == "cuda" else "float32", "mixed_precision": args.mixed_precision,
        }  # fmt: skip
        # Packed engines get as many max_length rows per step as fit in the padded engines' real
        # tokens per step: never fewer, larger updates than theirs.
        _, examples = tokenize(spec, 0, spec["records"])
        spec["packed_batch_size"] = args.packed_batch_size or _matching_rows(spec, examples)
        per_token, formula = flops_per_token(spec, token_stats(examples))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        for repeat in range(args.repeats):
            for engine in engines if repeat % 2 == 0 else engines[::-1]:
                if engine in failed:
                    continue
                console.print(f"[bold]{engine}[/] (run {repeat + 1}/{args.repeats}) ...")
                result = Path(tmp) / f"{engine}-{repeat}.json"
                started = time.time()
                proc = subprocess.run([sys.executable, __file__, "--worker", engine, "--spec", str(spec_path), "--result", str(result)],
                                      env=env, capture_output=True, text=True)  # fmt: skip
                if proc.returncode != 0:  # the other engines still run, and their rows are kept
                    failed[engine] = engine_failure(proc, time.time() - started)
                    console.print(f"[red]{engine} failed[/] after {failed[engine]['seconds']:.0f} s:")
                    console.print(proc.stderr[-3000:], markup=False, highlight=False)
                    continue
                runs[engine].append(json.loads(result.read_text()))

    def best(engine: str) -> dict:  # the fastest of the repeats
        return max(runs[engine], key=lambda r: r["tokens_per_s"])

    peak = None
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    rows = {e: best(e) for e in engines if runs[e]}
    if not rows:
        raise SystemExit("no engine finished, so there is no table: " + "; ".join(f"{e}: {f['error']}" for e, f in failed.items()))
    ours = rows.get("gptj-tune")
    for e, r in rows.items():
        r["runs_tokens_per_s"] = [x["tokens_per_s"] for x in runs[e]]
        if ours is not None and e != "gptj-tune":
            r["ours_over_this"] = ours["tokens_per_s"] / r["tokens_per_s"]
        r["flops_per_token"], r["flops_formula"] = per_token, formula
        r["model_tflops"] = r["tokens_per_s"] * per_token / 1e12
        if args.device == "cuda":
            r["mfu"] = r["model_tflops"] * 1e12 / peak if peak else None

    title = (f"train throughput: {args.shape} GPT-J, {args.method}, {args.records} Alpaca records, max_length "
             f"{args.max_length}, batch {args.batch_size} (packed: {spec['packed_batch_size']} row"
             f"{'s' if spec['packed_batch_size'] != 1 else ''}), {args.device}"
             f"{', gptj-tune in bf16 autocast' if args.mixed_precision == 'bf16' else ''}")  # fmt: skip
    console.print(results_table(title, rows, gpu=args.device == "cuda"))
    console.print(f"model FLOPs: {formula}" + (" (MFU: over the GPU's dense bf16 peak)" if args.device == "cuda" else ""))
    console.print("attention: " + "; ".join(f"{e} {r['attention']}" for e, r in rows.items()))
    versions = _versions()
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for e, f in failed.items():
        console.print(f"[red]{e} failed[/] (not in the table): {f['error']}", soft_wrap=True)
    report = {
        "settings": {k: v for k, v in spec.items() if k not in ("model",)}
        | {"repeats": args.repeats, "torch_threads": args.threads, "versions": versions, "device_name": _device_name(args.device)},
        "engines": rows,
        "failed": failed,
    }
    from gptj_tune.rundir import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2))  # an earlier result is replaced whole or not at all
    plot = out.with_suffix(".png")
    if results_plot(title, rows, plot, gpu=args.device == "cuda"):
        console.print(f"wrote {out} and {plot}")
    else:
        console.print(f"wrote {out} (no plot: matplotlib is not installed; pip install 'gptj-tune[eval]')")
    if any(math.isnan(r["held_out_loss"]) for r in rows.values()):
        raise SystemExit("a held-out loss is NaN")
    if failed:
        raise SystemExit(f"{len(failed)} engine(s) failed: {', '.join(failed)}; the others' results are written")


def engine_failure(proc: subprocess.CompletedProcess, seconds: float) -> dict:
    """What the JSON keeps of a failed engine: its last error line (the exception), exit code and time."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {"error": lines[-1] if lines else f"exit code {proc.returncode}", "exit_code": proc.returncode, "seconds": seconds}


def _device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (Linux), for the JSON."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    import platform

    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} cores)" if names else platform.machine()


if __name__ == "__main__":
    main()
