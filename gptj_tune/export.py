"""`gptj-tune export`: a run's weights as a plain Hugging Face folder (LoRA merged, ZeRO-3/FSDP shards
consolidated offline), with tokenizer, generation config and model card; then reloaded in a fresh
process and checked against the model as trained."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GptjTuneError, RunDirError
from .model.load import DTYPES
from .model.prompt_tuning import SoftPromptModel
from .model.trained import holds_trained_model, load_trained_model
from .recipe import Recipe, check_shard_size, load_recipe
from .rundir import RunDir, atomic_dir, guard_output, run_inputs, refuse_damaged, warn
from .stages import Stage, no_display

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Max |logit difference| allowed against the model as trained, per export dtype, as a fraction of
# the largest |logit| (16-bit rounding of weights and activations moves logits by ~1e-2 relative).
TOLERANCE = {"float32": 1e-5, "bfloat16": 6e-2, "float16": 1e-2}
VERIFY_PROMPTS = ["The quick brown fox", "Below is an instruction", "GPT-J is a 6 billion parameter"]
LICENCES = {
    "tatsu-lab/alpaca": "CC BY-NC 4.0 (research and non-commercial use only)",
    "databricks/databricks-dolly-15k": "CC BY-SA 3.0",
}


@dataclass(frozen=True)
class ExportRequest:
    """What `gptj-tune export` was asked for; `check` refuses bad values before any work."""

    run_dir: str
    out: str
    checkpoint: str = "final"  # final, latest, or step-N
    dtype: str | None = None  # None: the recipe's export.dtype, else the training dtype
    adapter_only: bool = False
    max_shard_size: str | None = None  # None: the recipe's export.max_shard_size
    force: bool = False
    verify: bool = True

    def check(self) -> None:
        if self.dtype is not None and self.dtype not in EXPORT_DTYPES:
            raise GptjTuneError(f"--dtype {self.dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
        if self.max_shard_size is not None:
            try:
                check_shard_size(self.max_shard_size, "--max-shard-size")
            except ValueError as e:
                raise GptjTuneError(str(e)) from None


@dataclass
class ExportResult:
    out: Path
    dtype: str
    max_abs_diff: float | None
    tolerance: float | None
    adapter_only: bool = False  # a peft adapter was written (--adapter-only, or a soft prompt); dtype: its base's


def export_run(request: ExportRequest, stage: Stage = no_display) -> ExportResult:
    """Write the run's model (or adapter) to `request.out`, whole or not at all, and verify it.
    `stage(text)` wraps each long part (stages.py: a spinner and its time on the console)."""
    request.check()
    run = RunDir(request.run_dir)
    if not run.recipe.is_file():
        raise RunDirError(f"{request.run_dir} is not a run directory (no recipe.yaml)")
    recipe = load_recipe(run.recipe)
    target = Path(request.out)
    guard_output(target, "--out", [*run.guarded(), *run_inputs(recipe)])
    if target.exists() and not request.force:
        raise RunDirError(f"{target} already exists; pass --force to replace it, or choose another --out")
    dtype = request.dtype or (recipe.export.dtype if recipe.export.dtype != "auto" else _training_dtype(recipe))
    base = str(run.path / "base-model") if (run.path / "base-model").is_dir() else recipe.model.name_or_path
    source = run.final if request.checkpoint == "final" else run.checkpoint(request.checkpoint, warn=warn)
    if not source.is_dir():
        raise RunDirError(f"{source} does not exist: the run has no final model yet; export a checkpoint (--checkpoint latest)")
    if source == run.final:
        refuse_damaged(source)
    try:
        return _export_into(request, run, recipe, target, source, base, dtype, stage)
    except Exception as e:
        from .train.disk import free_bytes, is_disk_full, size

        if not is_disk_full(e):
            raise
        raise GptjTuneError(f"the disk of --out ({target.parent}) is full ({size(free_bytes(target.parent))} free); the "
                            f"unfinished export was removed. Free space there or choose another --out (a merged model "
                            f"takes 2 bytes a parameter in 16-bit, 4 in float32: GPT-J-6B ~12 or ~24 GB), then run "
                            f"the command again") from None  # fmt: skip


def _export_into(request: ExportRequest, run: RunDir, recipe: Recipe, target: Path, source: Path, base: str, dtype: str,
                 stage: Stage) -> ExportResult:  # fmt: skip
    lora = recipe.method.kind in ("lora", "qlora")
    qlora = recipe.method.kind == "qlora"
    adapter_only, verify = request.adapter_only, request.verify
    with atomic_dir(target) as tmp:
        with stage(f"loaded the model as trained ({source})"):
            model, tokenizer = _trained_model(recipe, run, source, base)
            reference = _logits(model, tokenizer) if verify else None
        adapter = hasattr(model, "peft_config")  # what the folder holds, whatever the recipe says
        # A soft prompt is no weight change to merge: it is exported as the peft adapter it is saved as.
        adapter_only = adapter_only or isinstance(model, SoftPromptModel)
        # An adapter is checked on the base in the dtype it was trained on, as the reference ran.
        checked = _training_dtype(recipe) if adapter_only else dtype
        qlora_tolerance = None
        if qlora and not adapter_only:  # merged into the original base, as it was before quantization
            with stage(f"loaded the unquantized base ({base}) for the merge"):
                model, qlora_tolerance = _unquantized(model, tokenizer, recipe, base, folder_of(source), verify)
        if adapter_only and not adapter and not isinstance(model, SoftPromptModel):
            raise GptjTuneError(f"--adapter-only applies to LoRA runs; {source} holds every weight" if lora else
                                "--adapter-only applies to LoRA runs; this run trained every weight")  # fmt: skip
        if isinstance(model, SoftPromptModel):
            model.save_pretrained(tmp)
        elif adapter_only:
            with stage("wrote the adapter"):
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            with stage(f"{'merged the adapter and ' if adapter else ''}wrote the {dtype} weights"):
                merged = model.merge_and_unload() if adapter else model
                merged.to(DTYPES[dtype]).save_pretrained(tmp, max_shard_size=request.max_shard_size or recipe.export.max_shard_size, safe_serialization=True)
                _write_generation_config(merged, tokenizer, tmp)
        tokenizer.save_pretrained(tmp)
        about = {"template": recipe.model_dump(mode="json")["data"]["template"], "base_model": recipe.model.name_or_path,
                 "method": recipe.method.kind}  # fmt: skip
        if qlora and adapter_only:  # how to load its base as it trained (eval and generate read this)
            from .model.quantize import quantized_args

            about["quantized"] = quantized_args(recipe.method, _training_dtype(recipe))
        (tmp / "gptj-tune.json").write_text(json.dumps(about, indent=2))
        (tmp / "README.md").write_text(model_card(recipe, run, dtype, adapter_only))
        diff = tol = None
        if verify:
            with stage("reloaded the export in a fresh process and compared its logits"):
                diff, tol = _verify(tmp, reference, checked, adapter_only, base, about.get("quantized"), qlora_tolerance)
    return ExportResult(target, checked, diff, tol, adapter_only)


def folder_of(source: Path) -> Path:
    """Where a checkpoint or final/ keeps its weights."""
    return source / "model" if (source / "model").is_dir() else source


def _unquantized(quantized_model, tokenizer, recipe: Recipe, base: str, folder: Path, verify: bool):
    """A qlora run's adapter on its base in 16 bits, as the base was before quantization (what a
    merged export holds), and the tolerance its logits get against the 4-bit model as trained:
    merging removes the 4-bit rounding of the base, which moves the logits by about what it moves
    the base's own (measured here on the same prompts, adapters off); the adapter trained on top
    changes that little, so the tolerance is 1.5 x that gap, plus the export dtype's own."""
    model = load_trained_model(base, folder, DTYPES[_training_dtype(recipe)])
    if not verify:
        return model, None
    with quantized_model.disable_adapter(), model.disable_adapter():
        gap = max((a - b).abs().max().item() for a, b in zip(_logits(quantized_model, tokenizer).values(),
                                                              _logits(model, tokenizer).values()))  # fmt: skip
    return model, 1.5 * gap


def _training_dtype(recipe: Recipe) -> str:
    """The recipe's model.dtype by its full name (`bf16` -> `bfloat16`)."""
    return str(DTYPES[recipe.model.dtype]).removeprefix("torch.")


def _trained_model(recipe: Recipe, run: RunDir, source: Path, base: str):
    """The model as trained, on CPU in its training dtype (one copy of the model): PeftModel for LoRA,
    SoftPromptModel for prompt tuning, the full model otherwise. Sharded checkpoints (ZeRO, FSDP)
    are read and consolidated here, without starting a distributed job."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[_training_dtype(recipe)]
    tokenizer = AutoTokenizer.from_pretrained(run.final if (run.final / "tokenizer_config.json").exists() else base)
    folder = folder_of(source)
    if holds_trained_model(folder):
        quantized = None
        if recipe.method.kind == "qlora" and (folder / "adapter_config.json").is_file():
            from .model.quantize import quantized_args

            quantized = quantized_args(recipe.method, _training_dtype(recipe))
        return load_trained_model(base, folder, dtype, quantized=quantized), tokenizer
    state = _consolidated_state(source)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if recipe.method.kind in ("lora", "qlora"):
        from .model.methods import apply_method

        model = apply_method(model, recipe.method, gradient_checkpointing=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RunDirError(f"{source}: consolidated weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, tokenizer


def _consolidated_state(source: Path) -> dict:
    if (source / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(source / "deepspeed"), tag="state")
    if (source / "fsdp").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(source / "fsdp", Path(tmp) / "full.pt")
            return torch.load(Path(tmp) / "full.pt", weights_only=False)["model"]
    if (source / "fsdp-full.pt").is_file():
        return torch.load(source / "fsdp-full.pt", weights_only=True)["model"]
    raise RunDirError(f"{source} holds no weights this version can read")


@torch.no_grad()
def _logits(model, tokenizer) -> dict:
    model.eval()
    out = {}
    for prompt in VERIFY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out[prompt] = model(input_ids=ids).logits.float()
    return out


def _write_generation_config(model, tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, do_sample=False, max_new_tokens=256)  # fmt: skip
    config.save_pretrained(folder)


_VERIFY_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, refs, adapter_only, base, dtype = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
quantized = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
reference = torch.load(refs)
tokenizer = AutoTokenizer.from_pretrained(folder)
if adapter_only:
    from peft import PeftModel
    options = {"dtype": getattr(torch, dtype)}
    if quantized:  # a qlora adapter, on its base in 4 bits as it trained
        from transformers import BitsAndBytesConfig
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantized["quant_type"],
            bnb_4bit_use_double_quant=quantized["double_quant"], bnb_4bit_compute_dtype=getattr(torch, quantized["dtype"]))
        options["device_map"] = {"": "cpu"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **options), folder)
    for layer in model.modules():  # the 4-bit layout it trained in, not bitsandbytes' CPU inference one (bf16 scales)
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
model.eval()
diff, scale = 0.0, 0.0
with torch.no_grad():
    for prompt, ref in reference.items():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits.float()
        logits = logits[:, logits.shape[1] - ref.shape[1]:]  # peft's soft-prompt logits start with the prompt's
        diff = max(diff, (logits - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
print(json.dumps({"max_abs_diff": diff, "scale": scale, "vocab": len(tokenizer), "rows": model.get_input_embeddings().weight.shape[0]}))
"""


def _verify(folder: Path, reference: dict, dtype: str, adapter_only: bool, base: str, quantized: dict | None = None,
            extra_tolerance: float | None = None) -> tuple[float, float]:  # fmt: skip
    """Reload the export in a fresh process and compare its logits with the model as trained.
    `dtype`: the export's weights, or for an adapter the base's dtype to load it on; `quantized`:
    an adapter's 4-bit base; `extra_tolerance`: added for a merged qlora export (`_unquantized`)."""
    with tempfile.TemporaryDirectory() as tmp:
        refs = Path(tmp) / "reference.pt"
        torch.save(reference, refs)
        argv = [sys.executable, "-c", _VERIFY_SCRIPT, str(folder), str(refs), "1" if adapter_only else "0", base, dtype]
        done = subprocess.run(argv + ([json.dumps(quantized)] if quantized else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise GptjTuneError(f"verification failed: the export does not load with plain transformers:\n{done.stderr[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    tolerance = TOLERANCE[dtype] * max(1.0, result["scale"]) + (extra_tolerance or 0.0)
    if result["max_abs_diff"] > tolerance:
        raise GptjTuneError(f"verification failed: logits of the export differ from the trained model by "
                            f"{result['max_abs_diff']:.3g} (tolerance {tolerance:.3g} for {dtype}); the export was not written")  # fmt: skip
    return result["max_abs_diff"], tolerance


def _what_the_folder_holds(recipe: Recipe, dtype: str, adapter_only: bool) -> str:
    """The model card's line on what the export is and how to load it."""
    if recipe.prompt_slots():
        return ("This folder holds a soft prompt (peft prompt tuning): load it on the base model with "
                "`PeftModel.from_pretrained`, or generate with `gptj-tune generate FOLDER`.")  # fmt: skip
    if adapter_only:
        return "This folder holds the LoRA adapter: load it on the base model with `PeftModel.from_pretrained`."
    if recipe.method.kind == "qlora":
        return (f"QLoRA adapter merged into the original (unquantized) base weights; weights in {dtype}; loads with "
                "`AutoModelForCausalLM.from_pretrained`.")  # fmt: skip
    if recipe.method.kind == "lora":
        return f"LoRA merged into the base weights; weights in {dtype}; loads with `AutoModelForCausalLM.from_pretrained`."
    return f"Weights in {dtype}; loads with `AutoModelForCausalLM.from_pretrained`."


def model_card(recipe: Recipe, run: RunDir, dtype: str, adapter_only: bool) -> str:
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else {}
    lines = [
        "---", "library_name: " + ("peft" if adapter_only else "transformers"), f"base_model: {recipe.model.name_or_path}",
        "tags: [gptj-tune, gpt-j]", "---", "",
        f"# {run.path.name}", "",
        f"Fine-tuned from **{recipe.model.name_or_path}** with gptj-tune ({recipe.method.kind}"
        + (f", r {recipe.method.r}, alpha {recipe.method.alpha}" if recipe.method.kind in ("lora", "qlora") else "")
        + (f", {recipe.prompt_slots()} virtual tokens" if recipe.prompt_slots() else "") + ").",
        _what_the_folder_holds(recipe, dtype, adapter_only),
        "", "## Training data", "",
    ]  # fmt: skip
    for source in recipe.data.sources:
        name = source.path or f"synthetic demo tasks ({source.count or 4000} records, generated by gptj-tune)"
        licence = LICENCES.get(source.path or "", "generated, no licence restriction" if source.format == "synthetic"
                               else "see the dataset's own licence")  # fmt: skip
        lines.append(f"- `{name}` (format {source.format}, weight {source.weight}): licence {licence}")
    template = recipe.model_dump(mode="json")["data"]["template"]
    lines += ["", f"Prompt template: `{template if isinstance(template, str) else 'custom'}`.", "", "## Training", ""]
    if summary:
        for key, label in [("steps", "steps"), ("tokens", "tokens"), ("final_loss", "final train loss"), ("eval_loss", "held-out loss"),
                           ("exact_match", "held-out exact match"), ("seconds", "wall time (s)")]:  # fmt: skip
            if summary.get(key) is not None:
                value = summary[key]
                lines.append(f"- {label}: {value:,.4g}" if isinstance(value, float) else f"- {label}: {value:,}")
    report = run.path / "eval" / "report.json"
    if report.exists():
        data = json.loads(report.read_text())
        lines += ["", "## Evaluation", "", "| task | metric | value |", "| --- | --- | --- |"]
        for task, metrics in data.get("benchmarks", {}).items():
            for metric, pair in metrics.items():
                lines.append(f"| {task} | {metric} | {pair['value']:.4f} |")
        held = data.get("held_out") or {}
        for key in ("loss", "perplexity", "exact_match", "rouge_l"):
            if held.get(key) is not None:
                lines.append(f"| held-out | {key} | {held[key]:.4f} |")
    lines += [
        "", "## Intended use and limitations", "",
        "A research artefact: outputs can be wrong, biased or offensive, as with the base model; check the licences "
        "of the training data above before any commercial use. Not evaluated for safety.", "",
        "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "",
    ]  # fmt: skip
    return "\n".join(lines)
