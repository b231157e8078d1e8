"""What a run does before and after its steps: the model made ready to train (method, speed paths,
compile), the data prepared once per machine and served as batches, the setup printed, the
benchmarks hook, and the final model saved."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.markup import escape

from ..data import PreparedData, prepare_data
from ..data.chat import template_text
from ..data.progress import data_progress
from ..data.batches import Batches
from ..errors import DataError, RecipeError
from ..model.compile import CompileUnavailable, check_can_compile, compile_blocks, compiled_blocks
from ..model.kernels import use_cheap_dropout, use_fused_lora
from ..model.load import check_fits_context, load_model_and_tokenizer
from ..model.loss_head import use_loss_head
from ..model.methods import apply_method, count_parameters
from ..recipe import QLoraMethod, Recipe
from ..manifest import write_manifest
from ..rundir import RunDir, atomic_dir
from .disk import DiskNeeds
from .engines import full_state_dict
from .memory import CPU_16BIT_WIDTH_MULTIPLE, own_trainable_weights


def model_to_train(recipe: Recipe, base: str, device: torch.device):
    """The model as the recipe trains it, and its tokenizer: loaded, the loss head fused, the method
    applied (full, LoRA, soft prompt), the speed paths switched on, the blocks compiled if asked."""
    quantized = recipe.method if isinstance(recipe.method, QLoraMethod) else None
    model, tokenizer = load_model_and_tokenizer(recipe.model, base, quantized, device)
    check_fits_context(model, recipe.data.max_length)
    if recipe.train.loss == "fused":
        use_loss_head(model)
    model = apply_method(model, recipe.method, recipe.model.gradient_checkpointing, tokenizer, recipe.train.seed)
    if device.type == "cpu":
        own_trainable_weights(model)  # off the checkpoint's file mapping: no copy-on-write fault per page in step 1
    use_cheap_dropout(model)
    use_fused_lora(model)
    if compiles(recipe, device):
        compile_model(model, device, recipe.computes_in_bf16())
    return model, tokenizer


def compiles(recipe: Recipe, device: torch.device) -> bool:
    """Whether the blocks are compiled: `train.compile` true, or `auto` on a CUDA GPU that can (Triton,
    and for bf16 an Ampere or newer GPU) in a single-process or ddp run."""
    if recipe.train.compile != "auto":
        return recipe.train.compile
    # (bitsandbytes' 4-bit layers are not compiled: qlora runs eager)
    if device.type != "cuda" or recipe.distributed.backend in ("deepspeed", "fsdp") or isinstance(recipe.method, QLoraMethod):
        return False
    try:
        check_can_compile(device, recipe.computes_in_bf16())
    except CompileUnavailable:
        return False
    return True


def compile_model(model, device, bf16: bool = False) -> int:
    """Compile the blocks' training forward (`train.compile`); a recipe error where that cannot be done."""
    try:
        check_can_compile(device, bf16)
    except CompileUnavailable as e:
        raise RecipeError([f"train.compile: {e}; or set train.compile: false"]) from None
    compiled = compile_blocks(model)
    if compiled == 0:
        raise RecipeError([f"train.compile: {type(model).__name__} has no transformer blocks gptj-tune can compile "
                           "(transformers' GradientCheckpointingLayer); set train.compile: false"])  # fmt: skip
    return compiled


def data_for_run(recipe: Recipe, tokenizer, console) -> PreparedData:
    """The recipe's token store from the shared cache, or built now with a progress line. Every
    process asks; one builds (data/cache.py), the others wait for the file, not in a collective, so
    a long preprocessing step cannot hit a collective timeout."""
    if any(source.is_chat for source in recipe.data.sources):  # saved with final/ and the export: apply_chat_template works
        tokenizer.chat_template = template_text(recipe.data.chat_template)
    with data_progress(console) as progress:
        data = prepare_data(recipe.data, tokenizer, recipe.prompt_slots(), progress, console.print)
    if not data.built:
        console.print(f"data: prepared earlier, read from {data.store.folder}")
    return data


def batches_of(recipe: Recipe, data: PreparedData, pad_id: int, accelerator) -> tuple[Batches, Batches]:
    """The training batches of this process and the held-out batches (shared out when scored)."""
    # 16-bit products on the CPU run on oneDNN, which builds (and keeps) a plan for every new matrix
    # shape: batch widths rounded up to a multiple of 64 give it a few shapes instead of one per width.
    width = CPU_16BIT_WIDTH_MULTIPLE if accelerator.device.type == "cpu" and recipe.computes_in_16_bits() else 1
    train = Batches(data.train_rows, recipe.train.batch_size, pad_id, recipe.train.seed,
                    rank=accelerator.process_index, world=accelerator.num_processes, width_multiple=width)  # fmt: skip
    held_out = Batches(data.eval_rows, recipe.eval.batch_size or recipe.train.batch_size, pad_id, 0,
                       shuffle=False, width_multiple=width)  # fmt: skip
    if len(train) == 0:
        raise DataError(
            f"{len(data.train_rows)} training rows cannot fill one batch of train.batch_size "
            f"{recipe.train.batch_size} on each of {accelerator.num_processes} processes; add data or lower train.batch_size"
        )
    return train, held_out


def print_setup(console, recipe: Recipe, model, data: PreparedData, world: int) -> None:
    trainable, total = count_parameters(model)
    s = data.train_stats
    layout = f" ({recipe.distributed.backend}, {world} processes)" if world > 1 else ""
    console.print(
        f"[bold]{recipe.method.kind}[/] on {escape(str(recipe.model.name_or_path))}{layout}: {trainable:,} trainable of {total:,} parameters"
    )
    console.print(
        f"data: {s.examples:,} train examples ({s.target_tokens:,} target tokens) in {len(data.train_rows):,} rows"
        f"{' packed' if recipe.data.packing else ''}, padding efficiency {data.padding_efficiency:.3f}; "
        f"{data.eval_stats.examples:,} held out"
    )
    if s.truncated or s.dropped or data.skipped_records:
        console.print(
            f"[yellow]data: {s.truncated} truncated and {s.dropped} dropped over max_length {recipe.data.max_length}; "
            f"{data.skipped_records} malformed records skipped[/]"
        )
    if recipe.data.deduplicate:
        console.print(f"data: {data.duplicates:,} duplicate records left out (data.deduplicate)")
    if compiled := compiled_blocks(model):
        console.print(f"torch.compile: {compiled} blocks share one compiled forward, built during the first steps")


def warn_updates_round_away(console, recipe: Recipe) -> None:
    fix = ("set train.kahan_summation: true" if not recipe.train.kahan_summation
           else "under FSDP use model.dtype: float32 with distributed.mixed_precision: bf16")  # fmt: skip
    console.print(
        "[yellow]warning:[/] AdamW updates the 16-bit weights directly, so updates much smaller than a weight "
        f"round to nothing (at lr 2e-5, for most of GPT-J's weights): {fix}"
    )


def benchmarks_during_training(recipe: Recipe, run: RunDir, accelerator, tokenizer, console):
    """A function (model, step, log) running the recipe's benchmarks on the main process, or None."""
    ev = recipe.eval
    if ev.benchmark_every is None:
        return None
    from ..evaluate.harness import find_data_dir, prepare_tasks, run_benchmarks_in_memory

    files = None
    if accelerator.is_main_process:
        files = prepare_tasks(list(ev.tasks), find_data_dir(None, ev.data_dir), run.path / "cache" / "benchmark-tasks")

    def run_them(model, step: int, log) -> None:
        if accelerator.is_main_process:
            with console.status(f"step {step}: benchmarks {', '.join(ev.tasks)}"):
                batch = ev.batch_size or recipe.train.batch_size
                result = run_benchmarks_in_memory(accelerator.unwrap_model(model), tokenizer, files, ev.limit, batch, accelerator.device)
            values = {task: {m: v for m, (v, _) in metrics.items()} for task, metrics in result["tasks"].items()}
            log({"step": step, "benchmarks": values, "benchmark_limit": ev.limit})
            console.print(f"step {step}: " + ", ".join(f"{t} {' '.join(f'{m} {v:.3g}' for m, v in ms.items())}" for t, ms in values.items()))
        accelerator.wait_for_everyone()

    return run_them


def save_final(recipe: Recipe, run: RunDir, accelerator, model, tokenizer, disk: DiskNeeds, step: int) -> None:
    """final/: the whole trained model or adapter, loadable with plain from_pretrained, and its
    manifest. Under sharding every process takes part in gathering the weights; the main process
    writes. A save that does not fit the disk is a DiskFullError saying how the run continues:
    from its checkpoint of this step (train.checkpoint_at_end), `--resume` saves final/ again
    without training."""
    state_dict = full_state_dict(accelerator, model, recipe)
    if accelerator.is_main_process:
        saved = run.list_checkpoints()
        if saved and saved[-1][0] == step:
            then = f"finish with `{run.resume_command()}` (it saves final/ from {saved[-1][1].name}, no training again)"
        else:
            last = f"from {saved[-1][1].name}" if saved else "from the start"
            then = f"`{run.resume_command()}` trains again {last} (train.checkpoint_at_end is off)"
        with disk.saving(run.path, "final/", disk.final, then), atomic_dir(run.final) as tmp:
            # save_pretrained empties the state dict it is given: hand it a copy
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=dict(state_dict) if state_dict else None)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp)
    accelerator.wait_for_everyone()


def held_out_exact_match(recipe: Recipe, run: RunDir, accelerator, model, base: str, tokenizer, data: PreparedData) -> float | None:
    """Greedy exact match on the first `eval.generate_samples` held-out prompts (main process), or None."""
    if not (recipe.eval.generate_samples and data.eval_records):
        return None
    from ..evaluate.heldout import exact_match

    trained = _model_for_generation(recipe, run, accelerator, model, base)
    records = data.eval_records[: recipe.eval.generate_samples]
    return exact_match(trained, tokenizer, data.template, records, recipe.eval.max_new_tokens).accuracy


def _model_for_generation(recipe: Recipe, run: RunDir, accelerator, model, base: str):
    """The model to generate with on the main process alone. Under ZeRO-3 or FSDP the weights are
    sharded (a forward needs every process), so the complete final/ is loaded instead."""
    from .engines import weights_are_sharded

    if not weights_are_sharded(recipe):
        return accelerator.unwrap_model(model)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..model.trained import load_trained_model

    unset_hf_deepspeed_config()  # load plainly, not partitioned across processes
    return load_trained_model(base, Path(run.final))
