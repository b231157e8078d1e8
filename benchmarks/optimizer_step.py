"""Benchmark (not a test): the time of one KahanAdamW step (full fine-tuning of 16-bit weights) over a
model's trainable tensors, with the one-kernel update called once per weight against once per
batch of weights of one size (`_BATCH_SIZES`), and the chunked fp32 passes beside them.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--shape tiny|small|gptj-6b|...]
        [--rows-divisor 1] [--steps 20] [--warmup 3] [--out optimizer.json]

The tensors have the shape's parameter shapes in bf16 (on a CPU, `--rows-divisor` cuts each
tensor's first dimension so the step's time is mostly its host-side calls), random gradients; the
time is per step after `--warmup` steps (which include compiling), the device synchronised. The
JSON holds the device, torch's version and the commit.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from train_throughput import _device_name
from workload import REPO, SHAPES, commit, config_of

sys.path.insert(0, str(REPO))

MODES = ("per weight", "batched", "chunked")


def tensors(shape: str, divisor: int, device: str):
    """The shape's trainable parameters (bf16, first dimension divided by `divisor`), with gradients,
    in build_optimizer's two groups."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = [p.shape for p in AutoModelForCausalLM.from_config(config_of(shape)).parameters()]
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for size in shapes:
        cut = (max(2 if len(size) > 1 else 64, size[0] // divisor), *size[1:])  # no size-1 dimension; 1-D: 64 or more
        p = torch.nn.Parameter(torch.randn(cut, generator=generator, device=device, dtype=torch.bfloat16) * 0.02)
        p.grad = torch.randn(cut, generator=generator, device=device, dtype=torch.bfloat16) * 1e-3
        params.append(p)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


def time_mode(mode: str, groups, device: str, steps: int, warmup: int) -> dict:
    import torch

    from gptj_tune.train import optim

    optim._BATCH_SIZES = (1,) if mode == "per weight" else (16, 8, 4, 2, 1)
    optim._fused_kahan_updates.cache_clear()  # a fresh compiled function: the graphs of this mode only
    optimizer = optim.KahanAdamW(groups, lr=1e-5, fused=mode != "chunked")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):
        optimizer.step()
    sync()
    warm = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    sync()
    ms = (time.perf_counter() - warm) / steps * 1e3
    del optimizer
    gc.collect()  # its states (6 bytes a weight) freed before the next mode's
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"ms_per_step": round(ms, 2), "warmup_s": round(warm - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="gptj-6b")
    parser.add_argument("--rows-divisor", type=int, default=None, help="default: 1 on a GPU, 4096 on a CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "optimizer-step.json")
    args = parser.parse_args()
    import torch
    from rich.console import Console
    from rich.table import Table

    from gptj_tune.model.compile import CompileUnavailable, check_can_compile

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    try:
        check_can_compile(torch.device(args.device))
    except CompileUnavailable as e:
        sys.exit(f"the one-kernel update needs torch.compile: {e}")
    divisor = args.rows_divisor or (1 if args.device == "cuda" else 4096)
    groups = tensors(args.shape, divisor, args.device)
    count = sum(len(g["params"]) for g in groups)
    numel = sum(p.numel() for g in groups for p in g["params"])
    rows = {mode: time_mode(mode, groups, args.device, args.steps, args.warmup) for mode in MODES}
    title = f"KahanAdamW step, {args.shape} ({count} tensors, {numel / 1e6:,.1f}M bf16 weights), {_device_name(args.device)}"
    table = Table(title=title)
    for column in ("update", "ms a step", "warm-up s (compiling)", "per weight / this"):
        table.add_column(column, justify="left" if column == "update" else "right")
    for mode, row in rows.items():
        table.add_row(mode, f"{row['ms_per_step']:.2f}", f"{row['warmup_s']:.1f}",
                      f"{rows['per weight']['ms_per_step'] / row['ms_per_step']:.2f}x")  # fmt: skip
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"title": title, "device": _device_name(args.device), "torch": torch.__version__,
                                    "commit": commit(), "shape": args.shape, "rows_divisor": divisor,
                                    "tensors": count, "weights": numel, "steps": args.steps, "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
