"""The training loop: one loop on accelerate for every method (full, LoRA).

Loss is the mean over target tokens of the whole optimizer step (all accumulated micro-batches),
so gradient accumulation gives the same update as one big batch. Batch g of the run is a pure
function of (data, seed, g), and checkpoints hold optimizer, scheduler and RNG states, so a resumed
run continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import PreparedData, prepare_data
from .data.tokenize import IGNORE, Batches
from .errors import GptjTuneError, RunDirError, TrainingError
from .methods import apply_method, count_parameters
from .models import block_causal_mask, load_model_and_tokenizer, resolve_base
from .recipe import Recipe, TrainSection
from .rundir import RunDir, atomic_dir, atomic_write_text


class Interrupted(GptjTuneError):
    """Stopped by Ctrl-C / SIGTERM after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    exact_match: float | None
    tokens: int
    seconds: float


# ----------------------------------------------------------------------------------- pieces


def batch_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of target tokens) for one batch."""
    positions = batch["position_ids"]
    out = model(
        input_ids=batch["input_ids"],
        position_ids=positions,
        attention_mask=block_causal_mask(positions, torch.float32),
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(model, batches: Batches, device) -> float | None:
    """Mean cross-entropy per target token over every eval batch."""
    if not batches.rows:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = batch_loss(model, _to(batch, device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)


def build_optimizer(model, train: TrainSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(train: TrainSection, total: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return int(round((train.warmup_ratio if train.warmup_ratio is not None else 0.03) * total))


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: RunDir, step: int, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    target = run.checkpoints / f"step-{step}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            tmp / "rng.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    run.prune_checkpoints(keep_last)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `folder`; return its trainer state."""
    from safetensors.torch import load_file

    weights = folder / "model"
    try:
        if (weights / "adapter_model.safetensors").exists():
            import peft

            peft.set_peft_model_state_dict(model, load_file(weights / "adapter_model.safetensors"))
        else:
            state = {}
            for file in sorted(weights.glob("*.safetensors")):
                state.update(load_file(file))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise RunDirError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=False)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise RunDirError(f"{folder}: checkpoint cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((folder / "trainer_state.json").read_text())


# -------------------------------------------------------------------------------- run dir


def prepare_run_dir(recipe: Recipe, resume: str | bool, force: bool) -> tuple[RunDir, Path | None]:
    """Check the run dir against the request; write the frozen recipe. Returns (run, checkpoint to load)."""
    import shutil

    run = RunDir(recipe.output.dir)
    if resume:
        if not run.recipe.exists():
            raise RunDirError(f"--resume: {run.path} holds no run (no recipe.yaml); start it without --resume")
        diff = _recipe_diff(run.recipe.read_text(), recipe.to_yaml())
        if diff:
            raise RunDirError(
                f"--resume: the recipe differs from the one {run.path} was started with at: {diff}. Resume "
                f"with the same recipe and --set values, or start a new run (output.dir)."
            )
        return run, run.checkpoint(resume)
    if run.is_used():
        if not force:
            raise RunDirError(
                f"{run.path} already holds a run. Use --resume to continue it, --force to delete it and start "
                f"over, or --set output.dir=runs/NEW for a new run."
            )
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe, recipe.to_yaml())
    return run, None


def _recipe_diff(old: str, new: str) -> str:
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, (dict, list)) and v else {key: v})
        return out

    a, b = flat(yaml.safe_load(old)), flat(yaml.safe_load(new))
    # output.dir may differ: a run directory can be moved or copied and still resumed.
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "output.dir")
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys[:6])


def _rewind_metrics(run: RunDir, step: int) -> None:
    """Drop metric lines after `step` so a resumed run's metrics.jsonl is one clean curve."""
    if not run.metrics.exists():
        return
    kept = [line for line in run.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(run.metrics, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------- train


def train(recipe: Recipe, resume: str | bool = False, force: bool = False, console=None) -> TrainResult:
    """Run the recipe into its run directory and return a summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console

    console = console or Console()
    run, checkpoint = prepare_run_dir(recipe, resume, force)
    accelerator = Accelerator()
    set_seed(recipe.train.seed)
    model, tokenizer = load_model_and_tokenizer(recipe.model, resolve_base(recipe.model, run.path))
    model = apply_method(model, recipe.method, recipe.model.gradient_checkpointing)
    data = prepare_data(recipe.data, tokenizer)
    _print_setup(console, recipe, model, data)

    pad_to = recipe.data.max_length if recipe.data.packing else None
    train_batches = Batches(data.train_rows, recipe.train.batch_size, tokenizer.pad_token_id, pad_to, recipe.train.seed)
    eval_batches = Batches(data.eval_rows, recipe.eval.batch_size or recipe.train.batch_size, tokenizer.pad_token_id, pad_to, 0, shuffle=False)
    accum = recipe.train.grad_accum
    total_steps = recipe.train.max_steps or (recipe.train.epochs or 1) * -(-len(train_batches) // accum)
    optimizer = build_optimizer(model, recipe.train)
    warmup = warmup_steps(recipe.train, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, recipe.train.schedule)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    state = {"step": 0, "micro_batch": 0, "tokens": 0, "seconds": 0.0}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        _rewind_metrics(run, state["step"])
        console.print(f"Resumed from [bold]{checkpoint}[/] at step {state['step']}/{total_steps}")

    loop = _Loop(recipe, run, accelerator, model, optimizer, scheduler, train_batches, eval_batches, console)
    last_loss = loop.run(state, total_steps)

    unwrapped = accelerator.unwrap_model(model)
    with atomic_dir(run.final) as tmp:
        unwrapped.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    eval_loss = evaluate_loss(model, eval_batches, accelerator.device)
    exact = None
    if recipe.eval.generate_samples and data.eval_records:
        from .evaluate import exact_match

        exact = exact_match(unwrapped, tokenizer, data.template, data.eval_records[: recipe.eval.generate_samples], recipe.eval.max_new_tokens).accuracy
    loop.log({"step": state["step"], "final_eval_loss": eval_loss, "exact_match": exact})
    result = TrainResult(run.path, state["step"], last_loss, eval_loss, exact, state["tokens"], state["seconds"])
    atomic_write_text(run.summary, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}, indent=2))
    return result


def _print_setup(console, recipe: Recipe, model, data: PreparedData) -> None:
    trainable, total = count_parameters(model)
    s = data.train_stats
    console.print(
        f"[bold]{recipe.method.kind}[/] on {recipe.model.name_or_path}: {trainable:,} trainable of {total:,} parameters"
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

    def __init__(self, recipe, run, accelerator, model, optimizer, scheduler, train_batches, eval_batches, console):
        self.recipe, self.rundir, self.accelerator, self.console = recipe, run, accelerator, console
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.stop_requested = False

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.rundir.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # second Ctrl-C: abort without saving
            raise KeyboardInterrupt
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
                loss, tokens, grad_norm = self._one_step(state)
                state["step"] += 1
                state["tokens"] += tokens
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

    def _one_step(self, state: dict) -> tuple[float, int, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, real tokens, grad norm)."""
        device = self.accelerator.device
        first = state["micro_batch"]
        micro = [_to(self.train_batches.get(first + k), device) for k in range(self.recipe.train.grad_accum)]
        targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        total = 0.0
        for batch in micro:
            loss_sum, _ = batch_loss(self.model, batch)
            self.accelerator.backward(loss_sum / max(targets, 1))
            total += float(loss_sum.detach())  # note: a host sync per micro-batch; cheap next to a CPU step
        loss = total / max(targets, 1)
        if not math.isfinite(loss):
            saved = self.rundir.list_checkpoints()
            last = f"last good checkpoint: {saved[-1][1]}" if saved else "no checkpoint was saved before it"
            raise TrainingError(
                f"loss is {loss} at step {state['step'] + 1}; training stopped before the update ({last}). "
                f"Lower train.lr, set train.max_grad_norm, or check the data of this step."
            )
        grad_norm = float("nan")
        if self.recipe.train.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.train.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["micro_batch"] = first + len(micro)
        real = sum(int(b["real_tokens"].sum()) for b in micro)
        return loss, real, grad_norm

    def _after_step(self, state: dict, total_steps: int) -> None:
        step, recipe = state["step"], self.recipe
        if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps:
            eval_loss = evaluate_loss(self.model, self.eval_batches, self.accelerator.device)
            if eval_loss is not None:
                self.log({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
                self.console.print(f"step {step}: eval loss {eval_loss:.4f}")
        periodic = recipe.train.save_every and step % recipe.train.save_every == 0
        if periodic or step == total_steps or self.stop_requested:
            path = save_checkpoint(
                self.rundir, step, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler, dict(state), recipe.train.keep_last
            )
            if self.stop_requested:
                raise Interrupted(
                    f"stopped at step {step}/{total_steps}; checkpoint saved to {path}. "
                    f"Continue with: gptj-tune run RECIPE --resume"
                )
