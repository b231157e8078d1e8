"""Benchmark (not a test): training throughput of gptj-tune against TRL's SFTTrainer and HF Trainer
on the same work: the same model weights, Alpaca records, GPT-2 tokenizer, tokens, max_length,
batch size, learning-rate schedule and seed; one epoch, so every engine trains on the same real
(non-pad) tokens.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--shape tiny|small|gptj-6b|neo-tiny|gpt-neo-2.7b]
        [--method lora|qlora|full] [--records 120 | --steps N] [--repeats 1] [--seed 0] [--out train_throughput.json]
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

Reported: real tokens/s in the steady state (from the end of step --warmup-steps to the last
step: without start-up and torch.compile's first steps) and end to end, padding efficiency (real tokens / token slots computed), peak memory
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

from checks import require_alpaca, require_at_least_one, require_device, require_max_length
from engines import worker
from workload import HELD_OUT, REPO, SHAPES, _matching_rows, commit, flops_per_token, model_for, token_stats, tokenize
from workload import label as shape_label

ENGINES = ["gptj-tune", "trl-default", "trl-best", "hf-trainer"]
# Dense bf16 peaks, by the first of these names found in torch.cuda.get_device_name() (SXM parts
# report e.g. "NVIDIA H100 80GB HBM3").
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


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
    parser.add_argument("--method", choices=["lora", "qlora", "full"], default="lora",
                        help="qlora: every engine gets the same 4-bit base (bitsandbytes NF4, double quantization).")
    parser.add_argument("--records", type=int, default=120, help="Alpaca records trained on (one epoch).")
    parser.add_argument("--steps", type=int, default=None,
                        help="The budget as the padded engines' optimizer steps: sets --records to steps x batch size.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--packed-batch-size", type=int, default=None,
                        help="Rows per step for the packing engines (default: the padded engines' tokens per step).")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="Steps left out of the steady tokens/s (start-up, compilation); 0: from the start.")
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
    if args.warmup_steps < 0:
        raise SystemExit(f"--warmup-steps {args.warmup_steps}: use 0 or more")
    if args.steps:
        args.records = args.steps * args.batch_size
    require_max_length(args.max_length)
    require_device(args.shape, args.device)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    data = require_alpaca(args.data_dir)
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
            "lr": args.lr or (5e-5 if args.method == "full" else 2e-4), "model": str(model_dir),
            "tokenizer": str(data / "gpt2-tokenizer"), "alpaca": str(data / "alpaca" / "alpaca_data.json"),
            "dtype": "bfloat16" if args.device == "cuda" else "float32", "mixed_precision": args.mixed_precision,
            "warmup_steps": args.warmup_steps,
        }  # fmt: skip
        # Packed engines get as many max_length rows per step as fit in the padded engines' real
        # tokens per step: never fewer, larger updates than theirs.
        _, examples = tokenize(spec, 0, spec["records"])
        spec["packed_batch_size"] = args.packed_batch_size or _matching_rows(spec, examples)
        per_token, formula = flops_per_token(spec, token_stats(examples, SHAPES[args.shape].get("window")))
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

    peak = peak_flops(args.device)
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

    title = (f"train throughput: {shape_label(args.shape)}, {args.method}, {args.records} Alpaca records, max_length "
             f"{args.max_length}, batch {args.batch_size} (packed: {spec['packed_batch_size']} row"
             f"{'s' if spec['packed_batch_size'] != 1 else ''}), {args.device}"
             f"{', gptj-tune in bf16 autocast' if args.mixed_precision == 'bf16' else ''}")  # fmt: skip
    console.print(results_table(title, rows, gpu=args.device == "cuda"))
    console.print(f"real tok/s: steady, from the end of step {args.warmup_steps} to the last (end to end where fewer "
                  "steps ran); end to end, all the training time: "
                  + ", ".join(f"{e} {r['end_to_end_tokens_per_s']:,.0f}" for e, r in rows.items()))  # fmt: skip
    console.print(f"model FLOPs: {formula}" + (" (MFU: over the GPU's dense bf16 peak)" if args.device == "cuda" else ""))
    console.print("attention: " + "; ".join(f"{e} {r['attention']}" for e, r in rows.items()))
    if args.device == "cuda" and "plan_gib" in rows.get("gptj-tune", {}):  # (a CPU's peak RSS holds the libraries too)
        ours = rows["gptj-tune"]
        console.print(f"gptj-tune plan: {ours['plan_gib']:.2f} GiB, measured peak {ours['peak_memory_gib']:.2f} GiB "
                      f"({ours['plan_gib'] / ours['peak_memory_gib'] - 1:+.1%})")  # fmt: skip
    versions = _versions()
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for e, f in failed.items():
        console.print(f"[red]{e} failed[/] (not in the table): {f['error']}", soft_wrap=True)
    report = {
        "settings": {k: v for k, v in spec.items() if k not in ("model",)}
        | {"repeats": args.repeats, "torch_threads": args.threads, "versions": versions, "device_name": _device_name(args.device),
           "commit": commit()},
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


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak (FLOP/s) by its name, for the MFU; None on a CPU or an unlisted GPU."""
    if device != "cuda":
        return None
    name = _device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
