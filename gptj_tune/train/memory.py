"""The host a CPU run trains on: its memory allocator, where the weights it will write live, and
whether its processor multiplies bf16 in hardware (train/loop.py calls these at setup, on CPU
only), and how much memory training took (`MemoryMeter`, CPU or GPU):

- freed memory kept for reuse: a training step frees and re-allocates the same large tensors
  (gradients, the head's logits chunk, the embedding's dense gradient); glibc hands allocations
  over 32 MB back to the OS on free, so every step page-faults them in again. The loop asks glibc
  to serve allocations from its heap and keep what is freed (`train.keep_freed_memory`).
- trainable weights copied off the checkpoint file: `from_pretrained` leaves CPU weights in a
  private mapping of the safetensors file. The first write to each 4 KiB page (the first
  optimizer step) then copies it on a page fault: 0.7 s for a 70M-parameter model, where one
  copy at setup takes 0.08 s. It also means a file replaced while the run trains no longer
  changes (or, truncated, crashes) the weights in memory.
- bf16 products: a CPU with AMX or AVX-512 bf16 multiplies bf16 matrices faster than fp32; setup
  prints a tip when bf16 autocast would pay and is not on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
from pathlib import Path

import torch
from torch import nn

# ------------------------------------------------------------------------------------- memory

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
KEEP_FREED_BYTES = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and to keep up to 1 GiB of freed memory
    for reuse, for the rest of this process. True when glibc took both settings; False where
    there is no glibc (macOS, musl), which changes nothing.

    Why: glibc maps allocations over 32 MB (the most its threshold adapts to) straight from the
    OS and unmaps them on free, so tensors a CPU training step frees and allocates again (the
    50400-row embedding's and head's gradients, a chunk of logits) are page-faulted in again on
    every step: 10% of a `small` full fine-tuning step. The cost: memory a run frees stays with
    the process (peak RSS 6% higher on that benchmark) until it ends.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def file_mapped_ranges(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """[start, end) address ranges this process maps from files (Linux); [] where that cannot be read."""
    try:
        text = maps.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        # address perms offset device inode path: anonymous memory has inode 0 and no "/" path
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def in_file_mapping(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether a tensor's storage lies in one of `ranges` (from `file_mapped_ranges`)."""
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


def own_trainable_weights(model: nn.Module, ranges: list[tuple[int, int]] | None = None) -> int:
    """Copy every trainable CPU parameter that lives in a file mapping (a safetensors checkpoint
    `from_pretrained` mapped) into the process's own memory, one parameter at a time. Frozen weights
    (LoRA's base) stay mapped: they are only read. Tied weights are one Parameter and stay tied.
    Returns how many parameters moved; 0 where no mapping can be seen (not Linux)."""
    ranges = file_mapped_ranges() if ranges is None else ranges
    if not ranges:
        return 0
    moved = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.device.type == "cpu" and p.numel() and in_file_mapping(p, ranges):
                p.data = p.data.clone(memory_format=torch.preserve_format)
                moved += 1
    return moved


# ------------------------------------------------------------------------------------ precision

# Narrower models gain nothing from bf16 on the CPU (the casts cost what the products save):
# measured here, the benchmark's tiny GPT-J (64 wide) 9,443 vs 9,475 tok/s, the quickstart 8% slower.
BF16_CPU_MIN_WIDTH = 256
# Batch widths are rounded up to this on the CPU when products run in 16 bits (oneDNN keeps a plan per shape).
CPU_16BIT_WIDTH_MULTIPLE = 64


# What bf16 autocast gained for a 512-wide GPT-J, full fine-tuning and LoRA (docs/speed.md), by the
# hardware that multiplies bf16: AMX tiles (Intel Sapphire Rapids and later; a 1024-square product
# on one core 756 against 157 GFLOP/s in fp32) or AVX-512 bf16 dot products (AMD Zen 4, Intel Cooper
# Lake; 131-143 against 65 GFLOP/s). CPUs with neither emulate bf16, far slower than fp32.
BF16_GAINS = {"AMX": "1.3-1.7x", "AVX-512 bf16": "1.3-1.4x"}


@functools.cache
def cpu_bf16_hardware() -> str | None:
    """The hardware this CPU multiplies bf16 matrices with (a key of BF16_GAINS), or None."""
    for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX-512 bf16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, check, lambda: False)():
                return name
        except RuntimeError:
            continue
    return None


def bf16_advice(model: nn.Module, device: torch.device, mixed_precision: str, hardware: str | None = "detect") -> str | None:
    """A one-line tip when bf16 autocast would train this model faster than the fp32 it is about to
    use: a CPU that multiplies bf16 in hardware (`hardware`, found on this CPU by default), fp32
    weights, no autocast asked for, and a model at least 256 wide."""
    width = getattr(model.config, "hidden_size", 0) or 0
    weights_fp32 = next(model.parameters()).dtype == torch.float32
    if device.type != "cpu" or mixed_precision != "no" or not weights_fp32 or width < BF16_CPU_MIN_WIDTH:
        return None
    hardware = cpu_bf16_hardware() if hardware == "detect" else hardware
    if hardware is None:
        return None
    return (f"this CPU multiplies bf16 in hardware ({hardware}): `--set distributed.mixed_precision=bf16` (fp32 "
            f"weights, bf16 products) trained a 512-wide GPT-J {BF16_GAINS[hardware]} faster on such a CPU")


def gpu_bf16_warning(computes_in_bf16: bool, device: torch.device, gpu: tuple[str, tuple[int, int]] | None = None) -> str | None:
    """A warning when a recipe computes in bf16 on a GPU older than Ampere (compute capability
    below 8.0: T4, V100), which has no bf16 arithmetic: it runs emulated, far slower. `gpu`: (name,
    capability), read from `device` by default."""
    if not computes_in_bf16 or device.type != "cuda":
        return None
    name, capability = gpu or (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    if capability >= (8, 0):
        return None
    return (f"the {name} (compute capability {capability[0]}.{capability[1]}) has no bf16 arithmetic, and this recipe "
            f"computes in bf16 (model.dtype or distributed.mixed_precision): it runs emulated, many times slower. "
            f"Train on an Ampere or newer GPU, or in float16 (model.dtype: float32 with distributed.mixed_precision: "
            f"fp16, which scales the loss)")  # fmt: skip


# -------------------------------------------------------------------------------------- measure


class MemoryMeter:
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
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
        except OSError:  # not Linux
            return 0
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def peak(self) -> tuple[int, str]:
        """(bytes, how measured): cuda_max_allocated, or cpu_rss_growth."""
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
        return max(0, self._status_kib("VmHWM") * 1024 - self.start_rss), "cpu_rss_growth"


# --------------------------------------------------------------------------------- out of memory


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's
    (a memory limit such as `ulimit -v`; without one, Linux's OOM killer ends the process instead)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


def out_of_memory_message(error: BaseException, recipe, device: torch.device, step: int, checkpoints: list) -> str:
    """One message for a step that ran out of memory: where, how much was asked for and held, what
    the plan estimated, what to change, and the checkpoint the run can continue from."""
    from ..errors import ModelError, first_line
    from ..plan import GIB, plan

    first = first_line(error)
    asked = re.search(r"(?:Tried to allocate|you tried to allocate) ([\d.]+) (\w+)", first)
    if asked:
        size = f"{float(asked.group(1)) / GIB:.2f} GiB" if asked.group(2) == "bytes" else f"{asked.group(1)} {asked.group(2)}"
        asked_text = f"it asked for {size} more"
    else:
        asked_text = first[:300]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        held = (f"; {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB were allocated at the peak, of the "
                f"{props.name}'s {props.total_memory / GIB:.1f} GiB")  # fmt: skip
        where = f"the GPU (cuda:{device.index if device.index is not None else torch.cuda.current_device()})"
    else:
        held, where = "", "the CPU (a memory limit of this process, such as `ulimit -v`)"
    try:
        planned = f"; `gptj-tune plan` estimated {plan(recipe).own_estimate.total / GIB:.1f} GiB a device for it"
    except ModelError:  # the config cannot be read again (the hub went away): the error is said without it
        planned = ""
    train = recipe.train
    fixes = [f"lower train.batch_size ({train.batch_size}; raise train.grad_accum to keep the update's size) or "
             f"data.max_length ({recipe.data.max_length})"]  # fmt: skip
    if not recipe.model.gradient_checkpointing:
        fixes.append("turn on model.gradient_checkpointing")
    if recipe.method.kind == "full":
        fixes.append("train LoRA or QLoRA (method.kind), or shard the states (distributed.backend: deepspeed or fsdp)")
    elif recipe.method.kind == "lora":
        fixes.append("put the base in 4 bits (method.kind: qlora)")
    if "expandable_segments" in str(error):
        fixes.append("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (memory was reserved but not allocated)")
    kept = f"checkpoints are kept, the last {checkpoints[-1][1]}" if checkpoints else "no checkpoint was saved before it"
    return (f"out of memory on {where} in step {step} ({train.batch_size} rows of up to {recipe.data.max_length} "
            f"tokens a micro-batch): {asked_text}{held}{planned}. To fit: {'; '.join(fixes)}. {kept[0].upper()}{kept[1:]} "
            f"(a resume must keep the recipe: with a changed one, start a new run)")  # fmt: skip
