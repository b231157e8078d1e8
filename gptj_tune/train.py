"""The training loop: one loop on accelerate for every method (full, LoRA).

Loss is the mean over target tokens of the whole optimizer step (all accumulated micro-batches),
so gradient accumulation gives the same update as one big batch. Batch g of the run is a pure
function of (data, seed, g), and checkpoints hold optimizer, scheduler and RNG states, so a resumed
run continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from .checkpoints import load_checkpoint, save_checkpoint
from .data import PreparedData, prepare_data
from .data.tokenize import Batches
from .distributed import full_state_dict, is_deepspeed, prepare_model_and_optimizer, weights_are_sharded
from .errors import DataError, RecipeError, Stopped, TrainingError
from .fast import CompileUnavailable, check_can_compile, compile_blocks, use_cheap_dropout, use_fused_lora, use_loss_head
from .host import CPU_16BIT_WIDTH_MULTIPLE, bf16_advice, keep_freed_memory, own_trainable_weights
from .methods import apply_method, count_parameters
from .models import check_fits_context, load_model_and_tokenizer, resolve_base
from .recipe import Recipe
from .rundir import RunDir, atomic_dir, atomic_write_text, prepare_run_dir, rewind_metrics
from .step import (
    LossPath,
    batch_loss,
    build_optimizer,
    clip_in_fused_step,
    evaluate_loss,
    lr_factor,
    step_takes_the_clip,
    target_count,
    to_device,
    updates_round_away,
    warmup_steps,
)


class Interrupted(Stopped):
    """Stopped by Ctrl-C / SIGTERM after saving a checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    exact_match: float | None
    tokens: int  # real (non-pad) tokens trained on
    slots: int  # token positions computed, padding included
    seconds: float
    peak_memory_bytes: int  # on the main process's device; see memory_measure
    memory_measure: str  # cuda_max_allocated, or cpu_rss_growth (peak RSS minus RSS when training began)


# ----------------------------------------------------------------------------------- pieces


def _compile(model, device) -> int:
    try:
        check_can_compile(device)
    except CompileUnavailable as e:
        raise RecipeError([f"train.compile: {e}; or set train.compile: false"]) from None
    compiled = compile_blocks(model)
    if compiled == 0:
        raise RecipeError([f"train.compile: {type(model).__name__} has no transformer blocks gptj-tune can compile "
                           "(transformers' GradientCheckpointingLayer); set train.compile: false"])  # fmt: skip
    return compiled


# ----------------------------------------------------------------------------------- train


def train(recipe: Recipe, resume: str | bool = False, force: bool = False, console=None) -> TrainResult | None:
    """Run the recipe into its run directory. Returns a summary on the main process, None on the others."""
    from accelerate.utils import set_seed
    from rich.console import Console

    from .distributed import in_worker, make_accelerator, prepare_deepspeed_builds

    if recipe.distributed.backend == "deepspeed" and not in_worker():  # one process, no launcher of ours
        prepare_deepspeed_builds(console or Console())
    accelerator = make_accelerator(recipe)
    if accelerator.device.type == "cpu" and recipe.train.keep_freed_memory:
        keep_freed_memory()  # no page faults for the tensors each step frees and allocates again
    memory = _MemoryMeter()
    main = accelerator.is_main_process
    console = (console or Console()) if main else Console(quiet=True)  # only the main process prints
    with accelerator.main_process_first():  # the main process checks and creates the run dir first
        run, checkpoint = prepare_run_dir(recipe, resume, force, create=main)
        base = resolve_base(recipe.model, run.path)
    set_seed(recipe.train.seed)
    model, tokenizer = load_model_and_tokenizer(recipe.model, base)
    check_fits_context(model, recipe.data.max_length)
    if recipe.train.loss == "fused":
        use_loss_head(model)
    model = apply_method(model, recipe.method, recipe.model.gradient_checkpointing, tokenizer, recipe.train.seed)
    if accelerator.device.type == "cpu":
        own_trainable_weights(model)  # off the checkpoint's file mapping: no copy-on-write fault per page in step 1
    use_cheap_dropout(model)
    use_fused_lora(model)
    compiled = _compile(model, accelerator.device) if recipe.train.compile else 0
    loss_path = LossPath.of(recipe, model)  # (refuses packing under attention that ignores its boundaries)
    data = _prepare_data_once(recipe, tokenizer, run, accelerator)
    _print_setup(console, recipe, model, data, accelerator.num_processes)
    if advice := bf16_advice(model, accelerator.device, recipe.distributed.mixed_precision):
        console.print(f"[cyan]tip:[/] {advice}")
    if compiled:
        console.print(f"torch.compile: {compiled} blocks share one compiled forward, built during the first steps")

    # 16-bit products on the CPU run on oneDNN, which builds (and keeps) a plan for every new matrix
    # shape: batch widths rounded up to a multiple of 64 give it a few shapes instead of one per width.
    width = CPU_16BIT_WIDTH_MULTIPLE if accelerator.device.type == "cpu" and recipe.computes_in_16_bits() else 1
    train_batches = Batches(data.train_rows, recipe.train.batch_size, tokenizer.pad_token_id, recipe.train.seed,
                            rank=accelerator.process_index, world=accelerator.num_processes, width_multiple=width)  # fmt: skip
    eval_batches = Batches(data.eval_rows, recipe.eval.batch_size or recipe.train.batch_size, tokenizer.pad_token_id, 0,
                           shuffle=False, width_multiple=width)  # fmt: skip
    if len(train_batches) == 0:
        raise DataError(
            f"{len(data.train_rows)} training rows cannot fill one batch of train.batch_size "
            f"{recipe.train.batch_size} on each of {accelerator.num_processes} processes; add data or lower train.batch_size"
        )
    accum = recipe.train.grad_accum
    total_steps = recipe.train.max_steps or (recipe.train.epochs or 1) * -(-len(train_batches) // accum)
    warmup = warmup_steps(recipe.train, total_steps)
    ds = is_deepspeed(accelerator)  # DeepSpeed steps the optimizer on fp32 master weights of its own
    model, optimizer = prepare_model_and_optimizer(accelerator, recipe, model, lambda m: build_optimizer(m, recipe.train, ds))
    if not ds and updates_round_away(optimizer):
        _warn_updates_round_away(console, recipe)
    # Built on the prepared optimizer (ZeRO-3 regroups the parameters), and not handed to
    # accelerate, whose scheduler wrapper steps once per process: stepped once per update here.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, recipe.train.schedule)
    )
    state = {"step": 0, "micro_batch": 0, "tokens": 0, "slots": 0, "seconds": 0.0}
    if checkpoint is not None:
        state = {"slots": 0} | load_checkpoint(recipe, checkpoint, accelerator, model, optimizer, scheduler)
        if main:
            rewind_metrics(run, state["step"])
        console.print(f"Resumed from [bold]{checkpoint}[/] at step {state['step']}/{total_steps}")

    benchmarks = _benchmarks_during_training(recipe, run, accelerator, tokenizer, console)
    loop = _Loop(recipe, run, accelerator, model, optimizer, scheduler, train_batches, eval_batches, loss_path, console, benchmarks)
    last_loss = loop.run(state, total_steps)

    _save_final(recipe, run, accelerator, model, tokenizer)
    eval_loss = evaluate_loss(model, eval_batches, accelerator, loss_path)
    peak = memory.peak()
    result = _finish(recipe, run, accelerator, model, base, tokenizer, data, loop, state, last_loss, eval_loss, peak) if main else None
    # Leave together: a process that exits while peers still hold the process group aborts.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _finish(recipe, run, accelerator, model, base, tokenizer, data, loop, state, last_loss, eval_loss, peak) -> TrainResult:
    """On the main process: generation check, last metrics line, summary.json."""
    exact = None
    if recipe.eval.generate_samples and data.eval_records:
        from .evaluate import exact_match

        trained = _trained_model_for_generation(recipe, run, accelerator, model, base)
        exact = exact_match(trained, tokenizer, data.template, data.eval_records[: recipe.eval.generate_samples], recipe.eval.max_new_tokens).accuracy
    loop.log({"step": state["step"], "final_eval_loss": eval_loss, "exact_match": exact})
    result = TrainResult(run.path, state["step"], last_loss, eval_loss, exact, state["tokens"], state["slots"], state["seconds"], *peak)
    atomic_write_text(run.summary, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}, indent=2))
    return result


class _MemoryMeter:
    """Peak memory of training on this process: CUDA's allocator peak, or on CPU how far the
    process's peak RSS (VmHWM, reset when training begins) rose above its RSS at that moment."""

    def __init__(self):
        import peft  # noqa: F401  (libraries loaded later would count as training memory)
        import transformers.models.gptj.modeling_gptj  # noqa: F401

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:  # "5" resets the peak RSS (Linux >= 4.0); getrusage's peak would include a parent's
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.start_rss = self._status_kib("VmRSS") * 1024

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def peak(self) -> tuple[int, str]:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
        return max(0, self._status_kib("VmHWM") * 1024 - self.start_rss), "cpu_rss_growth"


def _save_final(recipe: Recipe, run: RunDir, accelerator, model, tokenizer) -> None:
    """final/: the whole trained model or adapter, loadable with plain from_pretrained. Under
    sharding every process takes part in gathering the weights; the main process writes."""
    state_dict = full_state_dict(accelerator, model, recipe)
    if accelerator.is_main_process:
        with atomic_dir(run.final) as tmp:
            # save_pretrained empties the state dict it is given: hand it a copy
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=dict(state_dict) if state_dict else None)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def _trained_model_for_generation(recipe: Recipe, run: RunDir, accelerator, model, base: str):
    """The model to generate with on the main process alone. Under ZeRO-3 or FSDP the weights are
    sharded (a forward needs every process), so the complete final/ is loaded instead."""
    if not weights_are_sharded(recipe):
        return accelerator.unwrap_model(model)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # load plainly, not partitioned across processes
    if recipe.method.kind == "lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run.final)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run.final)


def _benchmarks_during_training(recipe: Recipe, run: RunDir, accelerator, tokenizer, console):
    """A function (model, step, log) running the recipe's benchmarks on the main process, or None."""
    ev = recipe.eval
    if ev.benchmark_every is None:
        return None
    from .harness import find_data_dir, prepare_tasks, run_benchmarks_in_memory

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


def _prepare_data_once(recipe: Recipe, tokenizer, run: RunDir, accelerator) -> PreparedData:
    """Tokenize and pack on one process per machine and share the result through a cache file.

    The other processes wait for the file, not in a collective, so a long preprocessing step cannot
    hit a collective timeout; a resumed run reuses the cache."""
    import hashlib

    from .distributed import wait_for_file

    slots = recipe.prompt_slots()
    if accelerator.num_processes == 1:
        return prepare_data(recipe.data, tokenizer, slots)
    key = hashlib.sha256(
        (recipe.data.model_dump_json() + tokenizer.name_or_path + str(len(tokenizer)) + f"slots={slots}").encode()
    ).hexdigest()[:16]
    cache = run.path / "cache" / f"data-{key}.pt"
    if accelerator.is_local_main_process and not cache.exists():
        data = prepare_data(recipe.data, tokenizer, slots)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        torch.save(data, tmp)
        tmp.replace(cache)
        return data
    wait_for_file(cache)
    return torch.load(cache, weights_only=False)  # our own file, written above by this job


def _warn_updates_round_away(console, recipe: Recipe) -> None:
    fix = ("set train.kahan_summation: true" if not recipe.train.kahan_summation
           else "under FSDP use model.dtype: float32 with distributed.mixed_precision: bf16")  # fmt: skip
    console.print(
        "[yellow]warning:[/] AdamW updates the 16-bit weights directly, so updates much smaller than a weight "
        f"round to nothing (at lr 2e-5, for most of GPT-J's weights): {fix}"
    )


def _print_setup(console, recipe: Recipe, model, data: PreparedData, world: int) -> None:
    trainable, total = count_parameters(model)
    s = data.train_stats
    layout = f" ({recipe.distributed.backend}, {world} processes)" if world > 1 else ""
    console.print(
        f"[bold]{recipe.method.kind}[/] on {escape(str(recipe.model.name_or_path))}{layout}: {trainable:,} trainable of {total:,} parameters"
    )
    console.print(
        f"data: {s.examples:,} train examples ({s.target_tokens:,} target tokens) in {len(data.train_rows):,} rows"
        f"{' packed' if recipe.data.packing else ''}, padding efficiency {data.padding_efficiency:.3f}; "
        f"{data.eval_stats.examples + (len(data.eval_rows) if not data.eval_records else 0):,} held out"
    )
    if s.truncated or s.dropped or data.skipped_records:
        console.print(
            f"[yellow]data: {s.truncated} truncated and {s.dropped} dropped over max_length {recipe.data.max_length}; "
            f"{data.skipped_records} malformed records skipped[/]"
        )


class _Loop:
    """The step loop, with its logging, eval, checkpoints and signal handling."""

    def __init__(self, recipe, run, accelerator, model, optimizer, scheduler, train_batches, eval_batches, loss_path, console, benchmarks=None):
        self.recipe, self.rundir, self.accelerator, self.console = recipe, run, accelerator, console
        self.benchmarks = benchmarks
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_batches, self.eval_batches = train_batches, eval_batches
        # stop_requested: this process was signalled (set by the handler, at any moment).
        # stopping: every process agreed, in the step's collective, to stop after this step. Only
        # the agreed flag decides the stop checkpoint: ZeRO-3 and FSDP save collectively, and one
        # process saving while another steps on is a deadlock.
        self.stop_requested, self.stopping, self.signalled_at = False, False, None
        self.loss_path = loss_path
        self.fused_clip = step_takes_the_clip(optimizer, accelerator)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.rundir.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _on_signal(self, signum, frame):
        # A launcher that passes a signal on (torchrun, SLURM's srun) delivers it twice within
        # milliseconds; only a second signal seconds later is the user's "abort now".
        # (Another process's signal may already have stopped this one through the step's collective.)
        if self.signalled_at is not None:
            if time.monotonic() - self.signalled_at > 2.0:
                raise KeyboardInterrupt
            return
        self.signalled_at = time.monotonic()
        if self.stop_requested or self.stopping:
            return
        self.stop_requested = True
        self.console.print("[yellow]Stopping: a checkpoint is saved after this step (Ctrl-C again to abort).[/]")

    def run(self, state: dict, total_steps: int) -> float:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._steps(state, total_steps)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _steps(self, state: dict, total_steps: int) -> float:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        train = self.recipe.train
        columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        loss = float("nan")
        started = time.perf_counter() - state["seconds"]
        session_start, session_first_step = time.perf_counter(), state["step"]
        self.model.train()
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=total_steps, completed=state["step"], info="")
            while state["step"] < total_steps:
                tick = time.perf_counter()
                loss, tokens, slots, grad_norm = self._one_step(state)
                state["step"] += 1
                state["tokens"] += tokens
                state["slots"] += slots
                state["seconds"] = time.perf_counter() - started
                record = {
                    "step": state["step"], "epoch": self.train_batches.epoch_of(state["micro_batch"] - 1),
                    "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "tokens": state["tokens"], "tokens_per_s": tokens / max(time.perf_counter() - tick, 1e-9),
                    "elapsed_s": state["seconds"],
                }  # fmt: skip
                self.log(record)
                info = f"loss {loss:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
                progress.update(task, completed=state["step"], info=info)
                if not self.console.is_terminal and (state["step"] % train.log_every == 0 or state["step"] == total_steps):
                    per_step = (time.perf_counter() - session_start) / (state["step"] - session_first_step)
                    eta = int(per_step * (total_steps - state["step"]))
                    self.console.print(f"step {state['step']}/{total_steps}  {info}  ETA {eta // 60}:{eta % 60:02d}")
                self._after_step(state, total_steps)
        return loss

    def _one_step(self, state: dict) -> tuple[float, int, int, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, real tokens, token slots, grad norm)."""
        from .distributed import all_sum

        acc, train = self.accelerator, self.recipe.train
        first = state["micro_batch"]
        on_host = [self.train_batches.get(first + k) for k in range(train.grad_accum)]
        # Counted before the batches move to the device: no device-to-host wait for them.
        local_targets = sum(target_count(b) for b in on_host)
        real = sum(int(b["real_tokens"].sum()) for b in on_host)
        slots = sum(b["input_ids"].numel() for b in on_host)
        micro = [to_device(b, acc.device) for b in on_host]
        targets = all_sum([local_targets], acc)[0]
        # The update is the mean loss over every target token of the step, on every process.
        # DDP/DeepSpeed average gradients over processes and accelerate (or DeepSpeed) divides each
        # micro-batch by grad_accum: the scale undoes both.
        scale = acc.num_processes * train.grad_accum / max(targets, 1)
        total, grad_norm = 0.0, float("nan")
        for batch, host in zip(micro, on_host, strict=True):
            with acc.accumulate(self.model):
                loss_sum = batch_loss(self.model, batch, self.loss_path, host_positions=host["position_ids"])
                value = float(loss_sum.detach())  # note: a host sync per micro-batch; cheap next to a step
                if not math.isfinite(value):
                    self._stop_on_nan(state, value)
                acc.backward(loss_sum * scale)  # under DeepSpeed the last one also steps the optimizer
                total += value
        if train.max_grad_norm is not None and self.fused_clip is not None:
            grad_norm = float(clip_in_fused_step(self.fused_clip, train.max_grad_norm))
        elif train.max_grad_norm is not None or is_deepspeed(acc):
            norm = acc.clip_grad_norm_(self.model.parameters(), train.max_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor
                norm = norm.full_tensor()
            grad_norm = float(norm) if norm is not None else float("nan")
        self.optimizer.step()
        if self.fused_clip is not None:
            self.fused_clip.__dict__.pop("grad_scale", None)  # one step only
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["micro_batch"] = first + len(micro)
        # One collective for the step's numbers, and for agreeing to stop after the same step.
        # A signal landing after this collective is this process's request for the next step's.
        total, real, slots, stop = all_sum([total, real, slots, float(self.stop_requested)], acc)
        self.stopping = stop > 0
        return total / max(targets, 1), int(real), int(slots), grad_norm

    def _stop_on_nan(self, state: dict, value: float) -> None:
        saved = self.rundir.list_checkpoints()
        last = f"last good checkpoint: {saved[-1][1]}" if saved else "no checkpoint was saved before it"
        raise TrainingError(
            f"loss is {value} at step {state['step'] + 1}; training stopped before the update ({last}). "
            f"Lower train.lr, set train.max_grad_norm, or check the data of this step."
        )

    def _after_step(self, state: dict, total_steps: int) -> None:
        step, recipe = state["step"], self.recipe
        if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps:
            eval_loss = evaluate_loss(self.model, self.eval_batches, self.accelerator, self.loss_path)
            if eval_loss is not None:
                self.log({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
                self.console.print(f"step {step}: eval loss {eval_loss:.4f}")
        every = recipe.eval.benchmark_every
        if self.benchmarks is not None and every and (step % every == 0 or step == total_steps):
            self.benchmarks(self.model, step, self.log)
        periodic = recipe.train.save_every and step % recipe.train.save_every == 0
        if periodic or step == total_steps or self.stopping:
            path = save_checkpoint(
                recipe, self.rundir, step, self.accelerator, self.model, self.optimizer, self.scheduler, dict(state)
            )
            if self.stopping:
                raise Interrupted(
                    f"stopped at step {step}/{total_steps}; checkpoint saved to {path}. "
                    f"Continue with: gptj-tune run RECIPE --resume"
                )
