"""Benchmark (not a test): a shipped recipe as a user runs it (its batch, accumulation, max_length,
gradient checkpointing, LoRA rank and dropout), on a random-init model of a benchmark shape and the
shared data, for a few optimizer steps: real tokens/s (steady, after `--warmup-steps`), model
TFLOP/s and on a GPU the MFU, the peak memory beside `gptj-tune plan`'s figure.

    python benchmarks/recipe_throughput.py --recipe alpaca-lora [--recipe novel-domain ...]
        [--device cpu|cuda] [--shape tiny|small|gptj-6b] [--steps 12] [--warmup-steps 3]
        [--set KEY=VALUE ...] [--model-dir DIR] [--data-dir ../shared/data] [--out recipes.json]

What is replaced, and only that: the model (`--shape`, random init, built once with `--model-dir`),
the tokenizer (the shared GPT-2 one), the data sources by format (alpaca: Alpaca 52k; text: the
four shared novels; dolly: the Dolly sample), `train.max_steps`, and what would spend time on
other things than training (evaluation, samples, checkpoints). Model FLOPs per real token are
train_throughput.py's count (6 or 4 x the weights that multiply tokens, the head over the scored
share, 6 x the adapters, attention over the mean causal span), with the recipe's own LoRA rank
and targets, from the rows the run trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from checks import require_device
from engines import steady_rate, step_marks
from train_throughput import _device_name, _versions, peak_flops
from workload import REPO, SHAPES, commit, model_for, peak_memory
from workload import flops_per_token as workload_flops_per_token

sys.path.insert(0, str(REPO))

DATA_BY_FORMAT = {"alpaca": "alpaca/alpaca_data.json", "text": "domain", "dolly": "dolly/dolly_sample_train20.jsonl"}


def recipe_for(name: str, shape: str, model_dir: Path, data: Path, steps: int, out: Path, extra: list[str]):
    """The shipped recipe with the model, tokenizer, data and length of run replaced."""
    from gptj_tune.recipe import load_recipe
    from gptj_tune.recipe_commands import resolve_recipe_path

    path = resolve_recipe_path(name)
    sources = [{"format": source.format, "path": str(data / DATA_BY_FORMAT[source.format])} for source in load_recipe(path).data.sources]
    overrides = [
        f"model.name_or_path={model_dir}", "model.revision=null", f"model.tokenizer={data / 'gpt2-tokenizer'}",
        f"data.sources={json.dumps(sources)}", "data.eval_fraction=0", f"train.max_steps={steps}", "train.epochs=null",
        f"train.save_every={10**6}", "train.checkpoint_at_end=false", "train.log_every=1", "eval.every_steps=null",
        "eval.generate_samples=0", f"output.dir={out}", *extra,
    ]  # fmt: skip
    return load_recipe(path, overrides)


def check_recipe(name: str, overrides: list[str]) -> None:
    """Before any work: the recipe exists, is valid with `--set`'s overrides, and every source has
    shared data to stand in."""
    from gptj_tune.errors import RecipeError
    from gptj_tune.recipe import load_recipe
    from gptj_tune.recipe_commands import resolve_recipe_path

    try:
        recipe = load_recipe(resolve_recipe_path(name), overrides)
    except RecipeError as e:
        raise SystemExit(f"--recipe {name}: {e}") from None
    for source in recipe.data.sources:
        if source.format not in DATA_BY_FORMAT:
            raise SystemExit(f"--recipe {name}: no shared data for its {source.format!r} source; "
                             f"formats with shared data: {sorted(DATA_BY_FORMAT)}")  # fmt: skip


def row_stats(rows, window: int | None) -> dict[str, float]:
    """`workload.token_stats` over packed rows: the scored share and mean causal span of their real
    tokens (each packed example restarts its positions), and within `window` for GPT-Neo."""
    real = scored = spans = local = 0
    for row in rows:
        for position, label in zip(row.position_ids, row.labels, strict=True):
            real += 1
            scored += label != -100
            spans += position + 1
            local += min(position + 1, window or 1)
    stats = {"scored_share": scored / real, "mean_span": spans / real}
    if window:
        stats["mean_local_span"] = local / real
    return stats


def flops_per_token(recipe, shape: str, rows) -> tuple[float, dict]:
    """Model FLOPs per real token of this recipe on `shape` (train_throughput.py's count with the
    recipe's own rank and targets), and the token statistics behind them."""
    method, stats = recipe.method, row_stats(rows, SHAPES[shape].get("window"))
    spec = {"shape": shape, "method": method.kind}
    if method.kind in ("lora", "qlora"):  # `all-linear` and the default both mean the six linears
        spec |= {"lora_r": method.r, "lora_targets": method.target_modules if isinstance(method.target_modules, list) else None}
    total, _ = workload_flops_per_token(spec, stats)
    return total, {"real_tokens_sampled": sum(len(r.labels) for r in rows), **stats}


def worker(args) -> None:
    """One recipe in this process (`--result`): its row as JSON; a recipe error is one line, exit 2."""
    from gptj_tune.cli import quiet_libraries
    from gptj_tune.errors import RecipeError

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            row = run_one(args.recipe[0], args, Path(args.model_dir), Path(args.data_dir), Path(tmp))
        except RecipeError as e:
            print(f"--recipe {args.recipe[0]}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    Path(args.result).write_text(json.dumps(row))


def run_one(name: str, args, model_dir: Path, data: Path, scratch: Path) -> dict:
    import torch
    from rich.console import Console

    from gptj_tune.data_commands import recipe_data
    from gptj_tune.plan import GIB, plan
    from gptj_tune.train.loop import train

    out = scratch / name
    recipe = recipe_for(name, args.shape, model_dir, data, args.steps, out, args.set)
    planned = plan(recipe)
    plan_gib = planned.own_estimate.total / GIB
    console = Console(stderr=True)
    prepared, _, _ = recipe_data(recipe, console)  # `gptj-tune data prepare`: the run reads this store from the cache
    rows = [prepared.train_rows[i] for i in range(min(len(prepared.train_rows), 2000))]
    per_token, stats = flops_per_token(recipe, args.shape, rows)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, console=console)
    end_to_end = result.tokens / result.seconds
    rate = steady_rate(step_marks(out), args.warmup_steps) or end_to_end
    row = {
        "recipe": name, "steps": result.steps, "real_tokens": result.tokens, "seconds": result.seconds,
        "tokens_per_s": rate, "end_to_end_tokens_per_s": end_to_end, "padding_efficiency": result.tokens / result.slots,
        "rows_per_step": recipe.train.batch_size * recipe.train.grad_accum, "max_length": recipe.data.max_length,
        "gradient_checkpointing": recipe.model.gradient_checkpointing, "method": recipe.method.kind,
        "model_tflops": rate * per_token / 1e12, "gflop_per_token": per_token / 1e9, **stats,
        "peak_memory_gib": peak_memory(args.device), "plan_gib": plan_gib,
    }  # fmt: skip
    peak = peak_flops(args.device)
    row["mfu"] = row["model_tflops"] * 1e12 / peak if peak else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", required=True, help="A shipped recipe's name or a recipe file (repeatable).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps (the recipe's own batch and accumulation).")
    parser.add_argument("--warmup-steps", type=int, default=3, help="Steps left out of the steady tokens/s.")
    parser.add_argument("--set", action="append", default=[], help="Another recipe override, KEY=VALUE (repeatable).")
    parser.add_argument("--model-dir", default=None, help="Build the random-init model here once and reuse it.")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="recipe_throughput.json")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # a worker: one recipe, its row written here
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.result:
        return worker(args)
    if args.steps < args.warmup_steps + 2:
        raise SystemExit(f"--steps {args.steps}: use at least --warmup-steps + 2 ({args.warmup_steps + 2}) for a steady rate")
    require_device(args.shape, args.device)
    data = Path(args.data_dir)
    if not (data / "gpt2-tokenizer").is_dir():
        raise SystemExit(f"--data-dir {data}: no gpt2-tokenizer/ there (the shared data folder; see its README.md)")
    for name in args.recipe:
        check_recipe(name, args.set)
    from rich.console import Console
    from rich.table import Table

    from gptj_tune.cli import quiet_libraries

    quiet_libraries()
    console = Console()
    rows, failed = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_for(args.shape, Path(args.model_dir) if args.model_dir else Path(tmp) / "model", console)
        for name in args.recipe:  # each in a process of its own: its own peak memory, nothing left from the last
            console.print(f"[bold]{name}[/] on {args.shape} ...")
            result = Path(tmp) / f"{len(rows) + len(failed)}.json"
            command = [sys.executable, __file__, "--recipe", name, "--device", args.device, "--shape", args.shape,
                       "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--model-dir", str(model_dir),
                       "--data-dir", str(data), "--result", str(result), *(f"--set={o}" for o in args.set)]  # fmt: skip
            proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode == 0 and result.exists():
                rows.append(json.loads(result.read_text()))
                continue
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            failed[name] = lines[-1] if lines else f"exit code {proc.returncode}"
            console.print(f"[red]{name} failed:[/]")
            console.print(proc.stderr[-3000:], markup=False, highlight=False)
    gpu = args.device == "cuda"
    table = Table(title=f"shipped recipes on {args.shape}, {_device_name(args.device)}")
    for column in ("recipe", "rows x length", "real tok/s", "TFLOP/s", *(("MFU",) if gpu else ()), "peak GiB", "plan GiB"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for r in rows:
        table.add_row(r["recipe"], f"{r['rows_per_step']} x {r['max_length']}", f"{r['tokens_per_s']:,.0f}", f"{r['model_tflops']:.3g}",
                      *((f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",) if gpu else ()),
                      f"{r['peak_memory_gib']:.2f}", f"{r['plan_gib']:.2f}")  # fmt: skip
    console.print(table)
    for name, error in failed.items():
        console.print(f"[red]{name} failed[/] (not in the table): {error}", soft_wrap=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": _device_name(args.device), "shape": args.shape, "steps": args.steps, "warmup_steps": args.warmup_steps,
              "versions": _versions(), "commit": commit(), "recipes": rows, "failed": failed}  # fmt: skip
    from gptj_tune.rundir import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2) + "\n")  # an earlier result is replaced whole or not at all
    console.print(f"wrote {out}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
