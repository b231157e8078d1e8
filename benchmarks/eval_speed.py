"""Benchmark (not a test): lm-eval items/s for each shipped task, through `gptj-tune`'s task files.

    python benchmarks/eval_speed.py [--shape tiny|gptj-6b] [--device cpu|cuda] [--limit 50]
        [--tasks piqa,arc_easy] [--out eval_speed.json]

`tiny` is the built-in tiny GPT-J around the real GPT-2 tokenizer (so GPT-J's 50400-row head);
`gptj-6b` is GPT-J-6B's shape with random weights in bf16 (GPU only). Data: ../shared/data/benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from checks import require_at_least_one, require_device

from gptj_tune.rundir import atomic_write_text

REPO = Path(__file__).resolve().parent.parent


def build_model(shape: str, folder: Path, tokenizer_dir: Path) -> None:
    from gptj_tune.model.load import build_tiny_gptj
    from gptj_tune.recipe import ModelSection

    if shape == "tiny":
        build_tiny_gptj(ModelSection(tokenizer=str(tokenizer_dir)), folder)
        return
    import torch
    from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

    with torch.device("cuda"):
        model = GPTJForCausalLM(GPTJConfig()).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "gptj-6b"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default=None, help="Comma-separated subset of the shipped tasks (default: all five).")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="eval_speed.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_at_least_one(args, "limit", "batch_size")
    from gptj_tune.cli import quiet_libraries

    quiet_libraries()
    from gptj_tune.evaluate.harness import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"--tasks: unknown {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
    data = Path(args.data_dir)
    if not (data / "benchmarks").is_dir() or not (data / "gpt2-tokenizer").is_dir():
        raise SystemExit(f"--data-dir: {data} has no benchmarks/ and gpt2-tokenizer/ (the shared data folder)")
    require_device(args.shape, args.device)

    from rich.console import Console
    from rich.table import Table

    from gptj_tune.evaluate.harness import prepare_tasks, run_benchmarks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(args.shape, model_dir, data / "gpt2-tokenizer")
        for task in tasks:
            files = prepare_tasks([task], data / "benchmarks", Path(tmp) / "tasks" / task)
            run_benchmarks({"pretrained": str(model_dir)}, files, 2, args.batch_size, args.device)  # warm-up
            start = time.perf_counter()
            result = run_benchmarks({"pretrained": str(model_dir)}, files, args.limit, args.batch_size, args.device)
            seconds = time.perf_counter() - start
            rows.append({"task": task, "items": args.limit, "seconds": seconds, "items_per_s": args.limit / seconds,
                         "metrics": {m: v for m, (v, _) in result["tasks"][task].items()}})  # fmt: skip
    table = Table("task", "items", "seconds", "items/s", title=f"lm-eval speed: {args.shape} on {args.device}")
    for r in rows:
        table.add_row(r["task"], str(r["items"]), f"{r['seconds']:.2f}", f"{r['items_per_s']:.1f}")
    Console().print(table)
    import torch

    meta = {"shape": args.shape, "device": args.device, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}  # fmt: skip
    atomic_write_text(Path(args.out), json.dumps({**meta, "results": rows}, indent=2))  # whole or not at all
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
