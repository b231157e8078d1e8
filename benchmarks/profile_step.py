"""Benchmark (not a test): where a gptj-tune training step's time goes, from torch.profiler over a
few steady steps of the throughput benchmark's workload (the same model shapes, Alpaca records,
GPT-2 tokenizer and recipe as its `gptj-tune` engine).

    python benchmarks/profile_step.py [--device cpu|cuda] [--shape tiny|small|gptj-6b] [--method lora|full]
        [--max-length 512] [--rows 1] [--warmup 3] [--steps 10] [--model-dir DIR] [--out profile.json]

Prints a table and writes JSON (and the table as text beside it, .txt):
- time per step by kind: GEMM (matrix products), attention, elementwise (activations, norms,
  rotary, dropout, casts; torch.compile's fused kernels apart), optimizer (every kernel the
  optimizer's step launches, on a GPU), copies (memcpy, memset, cat, layout),
  communication, other. On a GPU the kinds are of device kernels (their summed durations), with
  the GPU's idle time between kernels inside the profiled steps; on a CPU, of operators' own time;
- per step: kernel launches (GPU), operators dispatched, and host syncs: `.item()`-style reads
  (aten::_local_scalar_dense, on any device) and, on a GPU, stream/device synchronizations and
  device-to-host copies;
- the operators that take the most time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from checks import require_alpaca, require_at_least_one, require_device, require_max_length
from engines import run_ours
from workload import REPO, SHAPES, commit, model_for, tokenize

# Kinds by substrings of kernel or operator names, first match wins (lower case).
KINDS = [
    ("communication", ("nccl", "all_reduce", "allreduce", "gloo", "c10d")),
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa", "softmax_backward_data")),
    ("optimizer", ("adam", "multi_tensor", "optimizer", "_foreach", "kahan", "clip_grad", "norm_kernel")),
    ("GEMM", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cutlass", "cublas", "xmma",
              "gemv", "nvjet", "triton_tem_fused_mm")),
    ("compiled elementwise", ("triton_",)),  # inductor's fused kernels (torch.compile)
    ("copies", ("memcpy", "memset", "copy", "aten::to", "contiguous", "aten::cat", "aten::stack", "cat_", "transpose")),
    ("elementwise", ("elementwise", "vectorized", "aten::", "reduce", "gelu", "tanh", "dropout", "layer_norm", "embedding")),
]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, parts in KINDS:
        if any(part in lowered for part in parts):
            return kind
    return "other"


def merged_busy_us(intervals: list[tuple[float, float]]) -> float:
    """Time covered by the union of [start, end) intervals."""
    busy, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def summarise(events, steps: int, gpu: bool) -> dict:
    """The profiled steps' time by kind, counts per step and top operators, from profiler events."""
    from torch.autograd import DeviceType

    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    host: dict[str, float] = {}  # operators' own host time: on a GPU, where the launching time goes
    launches = syncs = dispatched = scalar_reads = 0
    kernels = []
    # On the GPU's timeline the profiler also draws the host's annotations (each ProfilerStep, the
    # optimizer's step): not kernels, but the optimizer's span says which kernels are its.
    def annotation(e) -> bool:
        return e.name.startswith("ProfilerStep") or "#" in e.name

    optimizer_spans = [(e.time_range.start, e.time_range.end) for e in events
                       if gpu and e.device_type == DeviceType.CUDA and e.name.startswith("Optimizer.step")]  # fmt: skip
    for e in events:
        if gpu and e.device_type == DeviceType.CUDA:
            if annotation(e):
                continue
            kind = "optimizer" if any(a <= e.time_range.start < b for a, b in optimizer_spans) else kind_of(e.name)
            kernels.append((e.time_range.start, e.time_range.end))
            duration = e.time_range.end - e.time_range.start
            by_kind[kind] = by_kind.get(kind, 0.0) + duration
            top[e.name] = top.get(e.name, 0.0) + duration
            syncs += "memcpy dtoh" in e.name.lower()
            continue
        if e.name in LAUNCHES:
            launches += 1
        elif e.name in SYNC_CALLS:
            syncs += 1
        elif e.name == "aten::_local_scalar_dense":
            scalar_reads += 1
        if e.name.startswith("aten::"):
            dispatched += 1
            host[e.name] = host.get(e.name, 0.0) + e.self_cpu_time_total
        if not gpu and e.name.startswith(("aten::", "Optimizer")) and not e.name.startswith("ProfilerStep"):
            own = e.self_cpu_time_total
            by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + own
            top[e.name] = top.get(e.name, 0.0) + own
    steps_us = [e.time_range.end - e.time_range.start for e in events if e.name.startswith("ProfilerStep")]
    total = sum(by_kind.values()) or 1.0
    result = {
        "steps": steps,
        "step_ms": sum(steps_us) / max(len(steps_us), 1) / 1e3,
        "by_kind": {k: {"ms_per_step": v / steps / 1e3, "share": v / total} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"name": n, "ms_per_step": v / steps / 1e3} for n, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]],
        "top_host_ops": [{"name": n, "ms_per_step": v / steps / 1e3} for n, v in sorted(host.items(), key=lambda kv: -kv[1])[:15]],
        "per_step": {"operators_dispatched": dispatched / steps, "scalar_reads": scalar_reads / steps,
                     "kernel_launches": launches / steps if gpu else None, "syncs": (syncs + scalar_reads) / steps if gpu else scalar_reads / steps},
    }  # fmt: skip
    if gpu and kernels:
        window = max(end for _, end in kernels) - min(start for start, _ in kernels)
        result["gpu_idle_ms_per_step"] = (window - merged_busy_us(kernels)) / steps / 1e3
        result["gpu_busy_share"] = merged_busy_us(kernels) / window if window else None
    return result


def table(title: str, summary: dict):
    from rich.table import Table

    out = Table(title=title, min_width=min(len(title) + 4, 100))
    out.add_column("kind")
    out.add_column("ms / step", justify="right")
    out.add_column("share", justify="right")
    for kind, v in summary["by_kind"].items():
        out.add_row(kind, f"{v['ms_per_step']:.2f}", f"{v['share']:.1%}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=1, help="Packed max_length rows per step.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps run before the profiled ones (not counted).")
    parser.add_argument("--steps", type=int, default=10, help="Steady steps profiled.")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="train.compile (regional torch.compile; auto: on a GPU).")
    parser.add_argument("--model-dir", default=None, help="As in train_throughput.py: build the model once, reuse it.")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="profile.json", help="The JSON; the table is written beside it as .txt.")
    args = parser.parse_args()
    require_at_least_one(args, "rows", "warmup", "steps")
    require_device(args.shape, args.device)
    require_max_length(args.max_length)
    data, out = require_alpaca(args.data_dir), Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from gptj_tune.cli import quiet_libraries

    quiet_libraries()
    import torch
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile, schedule

    console = Console()
    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_for(args.shape, Path(args.model_dir) if args.model_dir else Path(tmp) / "model", console)
        spec = {
            "device": args.device, "shape": args.shape, "method": args.method, "max_length": args.max_length,
            "batch_size": args.rows, "packed_batch_size": args.rows, "seed": 0, "model": str(model_dir),
            "lr": 2e-4 if args.method == "lora" else 5e-5, "tokenizer": str(data / "gpt2-tokenizer"),
            "alpaca": str(data / "alpaca" / "alpaca_data.json"), "dtype": "bfloat16" if gpu else "float32",
            "mixed_precision": "no", "compile": {"true": True, "false": False}.get(args.compile, "auto"),
        }  # fmt: skip
        # Enough records for the steps (one epoch: the run ends when they are used up), with a margin.
        _, sample = tokenize(spec, 0, 200)
        mean_length = sum(len(e.input_ids) for e in sample) / len(sample)
        needed_steps = 1 + args.warmup + args.steps + 2
        spec["records"] = min(50_000, int(needed_steps * args.rows * args.max_length / mean_length * 1.3) + 16)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        plan = schedule(wait=1, warmup=args.warmup, active=args.steps, repeat=1)
        console.print(f"profiling {args.steps} steps of {args.shape} {args.method} on {args.device} "
                      f"({args.rows} x {args.max_length} tokens a step, {spec['records']} records) ...")  # fmt: skip
        with profile(activities=activities, schedule=plan, record_shapes=False) as prof:
            run_ours(spec, Path(tmp), after_each_step=lambda step: prof.step())
        events = prof.events() or []
        if sum(1 for e in events if e.name.startswith("ProfilerStep")) < args.steps:
            raise SystemExit("the run ended before the profiled steps: raise --rows or lower --steps/--warmup")
        summary = summarise(events, args.steps, gpu)
    summary["settings"] = {k: v for k, v in vars(args).items()} | {"torch": torch.__version__, "commit": commit(),
                                                                   "device_name": torch.cuda.get_device_name() if gpu else "cpu"}  # fmt: skip
    title = f"where a step goes: {args.shape} {args.method}{'' if args.compile == 'auto' else ', compile ' + args.compile}, {args.rows} x {args.max_length} tokens, {args.device}"
    console.print(table(title, summary))
    per = summary["per_step"]
    line = (f"per step: {summary['step_ms']:.1f} ms; {per['operators_dispatched']:.0f} operators, {per['scalar_reads']:.0f} "
            f"scalar reads" + (f", {per['kernel_launches']:.0f} kernel launches, {per['syncs']:.0f} host syncs, GPU idle "
                               f"{summary.get('gpu_idle_ms_per_step', 0):.1f} ms" if gpu else ""))  # fmt: skip
    console.print(line)
    from gptj_tune.rundir import atomic_write_text

    atomic_write_text(out, json.dumps(summary, indent=2))
    record = Console(record=True, width=100, file=open(os.devnull, "w"))
    record.print(table(title, summary))
    record.print(line)
    atomic_write_text(out.with_suffix(".txt"), record.export_text())
    console.print(f"wrote {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    sys.exit(main())
