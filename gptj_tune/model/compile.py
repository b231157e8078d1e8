"""Regional `torch.compile` (`train.compile`, off by default): each transformer block's training
forward is compiled once (the blocks share the compiled code); evaluation and generation run the
blocks eagerly. Hooks (DDP) and gradient checkpointing stay outside the compiled code."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch
from torch import nn


class CompileUnavailable(RuntimeError):
    """torch.compile cannot generate code on this device (no C++ compiler on CPU, no Triton on GPU)."""


def check_can_compile(device: torch.device, bf16: bool = False) -> None:
    """Raise CompileUnavailable, saying what is missing, where inductor could not build kernels
    (`bf16`: the products run in bf16)."""
    if device.type == "cpu":
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(c) for c in compilers):
            raise CompileUnavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH, or CXX set")
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise CompileUnavailable("torch.compile on CUDA needs Triton (`pip install triton`, shipped with CUDA torch)")
        problem = triton_problem(torch.cuda.get_device_capability(device), bf16)
        if problem:
            raise CompileUnavailable(problem)


def triton_problem(capability: tuple[int, int], bf16: bool) -> str | None:
    """Why Triton cannot build this run's kernels for a GPU of compute `capability`, or None."""
    version = f"{capability[0]}.{capability[1]}"
    if capability < (7, 0):
        return f"torch.compile's Triton needs a GPU of compute capability 7.0 or newer, and this one is {version}"
    if bf16 and capability < (8, 0):
        return f"torch.compile's Triton has no bf16 before compute capability 8.0 (Ampere), and this GPU is {version}"
    return None


def compile_blocks(model: nn.Module) -> int:
    """Compile the training forward of every transformer block of `model` (transformers'
    GradientCheckpointingLayer: GPT-J's and GPT-Neo's blocks, and most decoder layers); returns how many.

    Regional compilation: the blocks of a class share one compiled forward (inductor recompiles once
    for varying batch widths, then treats the width as dynamic). It is used only while the module
    trains with grad enabled; evaluation and generation (KV cache, shapes that change every token)
    run eagerly. The class switch keeps parameters and state-dict keys, and module hooks (DDP) and
    gradient checkpointing wrap the compiled call instead of being traced into it.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    switched, inside = 0, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, GradientCheckpointingLayer) and not getattr(type(module), "compiled_for_training", False):
            module.__class__ = _compiled_block_class(type(module))
            inside.append(name + ".")
            switched += 1
    return switched


@functools.cache
def _compiled_block_class(cls: type) -> type:
    compiled_forward = torch.compile(cls.forward)

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return compiled_forward(self, *args, **kwargs)
        return cls.forward(self, *args, **kwargs)

    # transformers wraps the forward of every subclass for gradient checkpointing (outermost class only).
    return type(cls.__name__, (cls,), {"forward": forward, "compiled_for_training": True, "__module__": cls.__module__})


def compiled_blocks(model: nn.Module) -> int:
    """How many blocks of `model` run a compiled training forward."""
    return sum(1 for m in model.modules() if getattr(type(m), "compiled_for_training", False))
