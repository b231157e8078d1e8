"""The training loop: one loop on accelerate for every method (full, LoRA, prompt tuning) and every
engine (one process, DDP, DeepSpeed ZeRO, FSDP2). `train` reads top to bottom: set up, run the
steps, save, report.

Loss is the mean over target tokens of the whole optimizer step (all accumulated micro-batches),
so gradient accumulation gives the same update as one big batch. Batch g of the run is a pure
function of (data, seed, g), and checkpoints hold optimizer, scheduler and RNG states, so a resumed
run continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..data.batches import Batches
from ..errors import Stopped, TrainingError
from ..manifest import folder_bytes
from ..model.load import resolve_base
from ..plan import preflight_warning
from ..recipe import Recipe
from ..rundir import RunDir, atomic_write_text, prepare_run_dir, rewind_metrics
from ..stages import stage_display, warner
from .track import Trackers, check_trackers, last_logged_step
from .checkpoints import load_checkpoint, save_checkpoint
from .disk import DiskFullError, DiskNeeds, is_disk_full, planned_saves
from .engines import all_sum, is_deepspeed, prepare_model_and_optimizer
from .memory import MemoryMeter, bf16_advice, gpu_bf16_warning, is_out_of_memory, keep_freed_memory, out_of_memory_message
from .optim import build_optimizer, clip_in_fused_step, lr_factor, step_takes_the_clip, updates_round_away, warmup_steps, warmup_warning
from .setup import (
    batches_of,
    benchmarks_during_training,
    data_for_run,
    held_out_exact_match,
    model_to_train,
    print_setup,
    save_final,
    warn_updates_round_away,
)
from .signals import StopRequest
from .step import LossPath, batch_loss, evaluate_loss, target_count, to_device


class Interrupted(Stopped):
    """Stopped by Ctrl-C / SIGTERM after saving a checkpoint."""


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (trainer_state.json) and restored on resume."""

    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # global index of the next micro-batch (Batches.get)
    tokens: int = 0  # real (non-pad) tokens trained on
    slots: int = 0  # token positions computed, padding included
    seconds: float = 0.0  # training wall time, over every session of the run

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})  # (older runs: no slots)


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


@dataclass
class Training:
    """What the steps work with, set up once by `train`."""

    recipe: Recipe
    run: RunDir
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches
    held_out: Batches
    loss_path: LossPath
    console: object
    benchmarks: object = None  # (model, step, log) -> None, or None
    fused_clip: torch.optim.Optimizer | None = None  # the optimizer that takes the clip in its step (optim.py)
    trackers: Trackers | None = None  # logging.trackers, on the main process
    disk: DiskNeeds | None = None  # what a checkpoint and final/ take (train/disk.py)

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (main process), and the same to the trackers."""
        if self.accelerator.is_main_process:
            try:
                with open(self.run.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                if not is_disk_full(e):
                    raise
                raise DiskFullError(f"the disk of {self.run.path} is full (writing {self.run.metrics.name}); free space, then "
                                    f"continue from the last checkpoint with: {self.run.resume_command()}") from None  # fmt: skip
            if self.trackers is not None:
                self.trackers.log(record)


def train(recipe: Recipe, resume: str | bool = False, force: bool = False, console=None,
          after_each_step: Callable[[int], None] | None = None) -> TrainResult | None:  # fmt: skip
    """Run the recipe into its run directory. Returns a summary on the main process, None on the others.
    `after_each_step(step)` is called after every optimizer step (a profiler's `step`, for one)."""
    from accelerate.utils import set_seed
    from rich.console import Console

    from .engines import make_accelerator
    from .extension_builds import prepare_deepspeed_builds
    from .workers import in_worker, keep_until_exit

    check_trackers(recipe)  # (a missing package, a server that does not answer: before anything loads)
    if recipe.distributed.backend == "deepspeed" and not in_worker():  # one process, no launcher of ours
        prepare_deepspeed_builds(console or Console())
    accelerator = make_accelerator(recipe)
    if accelerator.device.type == "cpu" and recipe.train.keep_freed_memory:
        keep_freed_memory()  # no page faults for the tensors each step frees and allocates again
    memory = MemoryMeter()
    main = accelerator.is_main_process
    console = (console or Console()) if main else Console(quiet=True)  # only the main process prints
    with accelerator.main_process_first():  # the main process checks and creates the run dir first
        run, checkpoint = prepare_run_dir(recipe, resume, force, create=main, warn=warner(console))
        base = resolve_base(recipe.model, run.path)
    if resume and accelerator.num_processes > 1:  # the main process verified and picked it: every process loads that one
        step = all_sum([float(checkpoint.name.removeprefix("step-")) if main else 0.0], accelerator)[0]
        checkpoint = run.checkpoints / f"step-{int(step)}"

    if main:  # before the model loads: what the GPU will not hold, or not compute fast
        for warning in (preflight_warning(recipe, accelerator.device), gpu_bf16_warning(recipe.computes_in_bf16(), accelerator.device)):
            if warning:
                warner(console)(warning)
    set_seed(recipe.train.seed)
    with stage_display(console, quiet_below=5.0)(f"loaded {recipe.model.name_or_path} for {recipe.method.kind}"):
        model, tokenizer = model_to_train(recipe, base, accelerator.device)  # (a 6B model: minutes)
    disk = DiskNeeds.estimate(model, recipe)
    loss_path = LossPath.of(recipe, model)  # (refuses packing under attention that ignores its boundaries)
    data = data_for_run(recipe, tokenizer, console)
    print_setup(console, recipe, model, data, accelerator.num_processes)
    if advice := bf16_advice(model, accelerator.device, recipe.distributed.mixed_precision):
        console.print(f"[cyan]tip:[/] {advice}")
    batches, held_out = batches_of(recipe, data, tokenizer.pad_token_id, accelerator)

    total_steps = recipe.train.max_steps or (recipe.train.epochs or 1) * -(-len(batches) // recipe.train.grad_accum)
    warmup = warmup_steps(recipe.train, total_steps)
    if main:
        if note := warmup_warning(warmup, total_steps):
            warner(console)(note)
        if checkpoint is not None:  # what one checkpoint takes is known now
            disk.checkpoint = folder_bytes(checkpoint)
        done = json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint is not None else 0
        disk.check_run(run, recipe, planned_saves(recipe, done, total_steps), len(run.list_checkpoints()))
    ds = is_deepspeed(accelerator)  # DeepSpeed steps the optimizer on fp32 master weights of its own
    model, optimizer = prepare_model_and_optimizer(accelerator, recipe, model, lambda m: build_optimizer(m, recipe.train, ds))
    if not ds and updates_round_away(optimizer):
        warn_updates_round_away(console, recipe)
    # Built on the prepared optimizer (ZeRO-3 regroups the parameters), and not handed to
    # accelerate, whose scheduler wrapper steps once per process: stepped once per update here.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, recipe.train.schedule))
    state, logged = TrainState(), last_logged_step(run) if checkpoint is not None and main else 0
    if checkpoint is not None:
        state = TrainState.from_saved(load_checkpoint(recipe, checkpoint, accelerator, model, optimizer, scheduler))
        if main and (damaged := rewind_metrics(run, state.step)):
            console.print(f"[yellow]note:[/] {damaged} damaged line(s) of {run.metrics} (cut short by a full disk or a "
                          f"kill) were dropped")  # fmt: skip
        console.print(f"Resumed from [bold]{checkpoint}[/] at step {state.step}/{total_steps}")
        if state.step >= total_steps:
            console.print(f"The run had already trained all {total_steps} steps: nothing left to train; final/ is saved and "
                          f"evaluated again. To train longer, raise train.max_steps (or train.epochs) and resume.")  # fmt: skip

    benchmarks = benchmarks_during_training(recipe, run, accelerator, tokenizer, console)
    t = Training(recipe, run, accelerator, model, optimizer, scheduler, batches, held_out, loss_path, console, benchmarks,
                 fused_clip=step_takes_the_clip(optimizer, accelerator),
                 trackers=start_trackers(recipe, run, logged, console) if main else None, disk=disk)  # fmt: skip
    if t.trackers is not None:
        console.print(f"trackers: {t.trackers.where()}")
    failed = run.path / "failed.json"  # what `gptj-tune runs` reports; a resume clears it
    if main:
        failed.unlink(missing_ok=True)
    try:
        try:
            last_loss = run_steps(t, state, total_steps, after_each_step)
        except RuntimeError as e:  # (torch.OutOfMemoryError is one)
            if not is_out_of_memory(e):
                raise
            message = out_of_memory_message(e, recipe, accelerator.device, state.step + 1, run.list_checkpoints())
            raise TrainingError(message) from None
    except TrainingError as e:
        if main:
            atomic_write_text(failed, json.dumps({"step": state.step + 1, "message": str(e)}))
        raise

    save_final(recipe, run, accelerator, model, tokenizer, disk, state.step)
    eval_loss = evaluate_loss(model, held_out, accelerator, loss_path)
    peak = memory.peak()
    result = None
    if main:
        exact = held_out_exact_match(recipe, run, accelerator, model, base, tokenizer, data)
        t.log({"step": state.step, "final_eval_loss": eval_loss, "exact_match": exact})
        result = TrainResult(run.path, state.step, last_loss, eval_loss, exact, state.tokens, state.slots, state.seconds, *peak)
        atomic_write_text(run.summary, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}, indent=2))
        if t.trackers is not None:
            t.trackers.artifacts([run.recipe, run.summary])
            t.trackers.finish()
    # Leave together: a process that exits while peers still hold the process group aborts. And a
    # worker never frees the DDP model itself: its teardown can hang once a peer has gone (workers.py).
    keep_until_exit(model, optimizer, scheduler, t, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def start_trackers(recipe: Recipe, run, logged: int, console) -> Trackers | None:
    if not recipe.logging.trackers:
        return None
    return Trackers(recipe, run, logged, warn=warner(console))


def run_steps(t: Training, state: TrainState, total_steps: int, after_each_step: Callable[[int], None] | None = None) -> float:
    """The optimizer steps from `state` to `total_steps`, with a progress bar, a metrics line per
    step, held-out loss, benchmarks and checkpoints as the recipe asks; a stop signal saves a
    checkpoint after the step. Returns the last step's loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    loss = float("nan")
    started = time.perf_counter() - state.seconds
    session_start, session_first_step = time.perf_counter(), state.step
    notice = "[yellow]Stopping: a checkpoint is saved after this step (Ctrl-C again to abort).[/]"
    t.model.train()
    with StopRequest(on_request=lambda: t.console.print(notice)) as stop, Progress(*columns, console=t.console) as progress:
        bar = progress.add_task("train", total=total_steps, completed=state.step, info="")
        while state.step < total_steps:
            tick, lr = time.perf_counter(), t.scheduler.get_last_lr()[0]  # the rate this step updates with
            loss, tokens, slots, grad_norm = one_step(t, state, stop)
            state.step += 1
            state.tokens += tokens
            state.slots += slots
            state.seconds = time.perf_counter() - started
            record = {
                "step": state.step, "epoch": t.batches.epoch_of(state.micro_batch - 1),
                "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": state.tokens, "tokens_per_s": tokens / max(time.perf_counter() - tick, 1e-9),
                "elapsed_s": state.seconds,
            }  # fmt: skip
            t.log(record)
            info = f"loss {loss:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            progress.update(bar, completed=state.step, info=info)
            if not t.console.is_terminal and (state.step % t.recipe.train.log_every == 0 or state.step == total_steps):
                per_step = (time.perf_counter() - session_start) / (state.step - session_first_step)
                eta = int(per_step * (total_steps - state.step))
                t.console.print(f"step {state.step}/{total_steps}  {info}  ETA {eta // 60}:{eta % 60:02d}")
            after_step(t, state, total_steps, stopping=stop.agreed)
            if after_each_step is not None:
                after_each_step(state.step)
    return loss


def one_step(t: Training, state: TrainState, stop: StopRequest) -> tuple[float, int, int, float]:
    """One optimizer step over grad_accum micro-batches; returns (loss, real tokens, token slots,
    grad norm). Its one collective also agrees, across processes, whether to stop after it."""
    acc, train = t.accelerator, t.recipe.train
    first = state.micro_batch
    on_host = [t.batches.get(first + k) for k in range(train.grad_accum)]
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
    # The loss is read once a step, with the gradient norm, after the step's backward passes are
    # queued: a read per micro-batch made the GPU wait, idle, for the host to queue each backward.
    # DeepSpeed steps its optimizer inside the last backward: there each loss is read before it.
    read_each = is_deepspeed(acc)
    sums, grad_norm = [], None
    for batch, host in zip(micro, on_host, strict=True):
        with acc.accumulate(t.model):
            loss_sum = batch_loss(t.model, batch, t.loss_path, host_positions=host["position_ids"])
            sums.append(loss_sum.detach().float())
            if read_each:
                _check_finite(t.run, state, float(sums[-1]))
            acc.backward(loss_sum * scale)  # under DeepSpeed the last one also steps the optimizer
    fused_clip = t.fused_clip
    if train.max_grad_norm is not None and fused_clip is not None:
        grad_norm = clip_in_fused_step(fused_clip, train.max_grad_norm)
    elif train.max_grad_norm is not None or is_deepspeed(acc):
        grad_norm = acc.clip_grad_norm_(t.model.parameters(), train.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
    read = torch.stack(sums).sum()
    if isinstance(grad_norm, torch.Tensor):
        read = torch.stack([read, grad_norm.detach().float().to(read.device)])
    values = read.reshape(-1).tolist()  # the step's one wait for the device
    total = values[0]
    grad_norm = values[1] if len(values) > 1 else (float(grad_norm) if grad_norm is not None else float("nan"))
    if not read_each:
        _check_finite(t.run, state, total)
    t.optimizer.step()
    if fused_clip is not None:
        fused_clip.__dict__.pop("grad_scale", None)  # one step only
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.micro_batch = first + len(micro)
    # One collective for the step's numbers, and for agreeing to stop after the same step.
    # A signal landing after this collective is this process's request for the next step's.
    total, real, slots, stopping = all_sum([total, real, slots, float(stop.requested)], acc)
    stop.agreed = stopping > 0
    return total / max(targets, 1), int(real), int(slots), grad_norm


def _check_finite(run: RunDir, state: TrainState, value: float) -> None:
    if not math.isfinite(value):
        _stop_on_nan(run, state, value)


def _stop_on_nan(run: RunDir, state: TrainState, value: float) -> None:
    saved = run.list_checkpoints()
    if saved and saved[-1][0] == state.step:  # the newest checkpoint holds the weights that gave this loss
        before = f"; the one before it: {saved[-2][1]} (--resume {saved[-2][1].name})" if len(saved) > 1 else ""
        last = f"the weights of {saved[-1][1]} gave it{before}"
    else:
        last = f"last checkpoint before it: {saved[-1][1]}" if saved else "no checkpoint was saved before it"
    raise TrainingError(
        f"loss is {value} at step {state.step + 1}; training stopped before the update ({last}). "
        f"Lower train.lr, set train.max_grad_norm, or check the data of this step."
    )


def after_step(t: Training, state: TrainState, total_steps: int, stopping: bool) -> None:
    """Held-out loss, benchmarks and checkpoints due after a step; with `stopping` (every process
    agreed) the checkpoint is saved and the run stops."""
    step, recipe = state.step, t.recipe
    if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps:
        eval_loss = evaluate_loss(t.model, t.held_out, t.accelerator, t.loss_path)
        if eval_loss is not None:
            t.log({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            t.console.print(f"step {step}: eval loss {eval_loss:.4f}")
    every = recipe.eval.benchmark_every
    if t.benchmarks is not None and every and (step % every == 0 or step == total_steps):
        t.benchmarks(t.model, step, t.log)
    periodic = recipe.train.save_every and step % recipe.train.save_every == 0
    if periodic or (step == total_steps and recipe.train.checkpoint_at_end) or stopping:
        path = save_checkpoint(recipe, t.run, step, t.accelerator, t.model, t.optimizer, t.scheduler, asdict(state), t.disk)
        if stopping:
            raise Interrupted(
                f"stopped at step {step}/{total_steps}; checkpoint saved to {path}. "
                f"Continue with: {t.run.resume_command()}"
            )
