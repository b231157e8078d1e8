"""The speed paths other than attention (gptj_tune/attention.py), each a class switch of existing
modules (weights, state-dict keys and saved configs stay stock), each tested equal to what it
replaces (tests/test_fast.py). GELU is switched when a model is loaded (models.py), the loss head,
dropout and LoRA add when it is set up for training (train.py):

- a fused, chunked cross-entropy head: the loss over the target tokens only (prompt and padding
  positions never reach the 50400-wide head), computed a chunk of tokens at a time, with the
  gradient taken in the same pass, so fp32 logits for the whole batch never exist. Under bf16
  autocast its products run in bf16 (the weight cast once, its gradient summed in fp32).
- one-kernel GELU: GPT-J's and GPT-Neo's `gelu_new` is written as eight elementwise operations,
  each with its own pass over the 4*d_model-wide MLP activations and its own saved tensor;
  torch's `gelu(approximate="tanh")` is the same function in one kernel (equal within 3e-7).
- cheaper dropout on CPU (LoRA's input dropout): torch's CPU dropout draws one 32-bit random
  number per element; ours draws 15 random bits per element (four elements per 64-bit draw), so the
  drop probability is `p` rounded to a multiple of 1/32768 and the kept values are scaled by the
  exact inverse of the keep probability. On GPUs torch's fused dropout kernel is kept.
- fused LoRA add: peft adds an adapter's output as `base + B(A(dropout(x))) * scaling`, three
  passes over the output; ours is one `torch.add(base, B(A(h)), alpha=scale)`, with the CPU
  dropout's rescaling folded into `scale`.
- regional `torch.compile` (`train.compile`, off by default): each transformer block's forward is
  compiled once (the blocks share the compiled code) and used for training steps; evaluation and
  generation run the blocks eagerly. Hooks (DDP) and gradient checkpointing stay outside.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import threading

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
DEFAULT_CHUNK_TOKENS = 2048


def switch_class(model: nn.Module, old: type, new: type) -> int:
    """Give every module of exactly type `old` the subclass `new` (same parameters, same names)."""
    switched = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            switched += 1
    return switched


# ------------------------------------------------------------------------------ GELU and dropout


@functools.cache
def _gelu_class():
    from transformers.activations import NewGELUActivation

    class OneKernelGELU(NewGELUActivation):
        """`gelu_new` (the tanh approximation of GELU) as torch's single fused kernel."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return F.gelu(input, approximate="tanh")

    return OneKernelGELU


def use_one_kernel_gelu(model: nn.Module) -> int:
    """Switch every `gelu_new` activation module of `model` to one kernel; returns how many."""
    from transformers.activations import NewGELUActivation

    return switch_class(model, NewGELUActivation, _gelu_class())


DROPOUT_BITS = 15  # random bits per element: p is rounded to a multiple of 1/32768


class _Dropout(torch.autograd.Function):
    """Zero elements with probability threshold/32768 and multiply the rest by `scale` (1.0: skipped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        n = x.numel()
        # random_() on int64 gives 63 random bits (the sign bit is 0): four int16 quarters, 15 uniform
        # bits each once their top bit is masked off.
        quarters = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
        keep = quarters.view(x.shape).bitwise_and_((1 << DROPOUT_BITS) - 1) >= threshold
        ctx.save_for_backward(keep)
        ctx.scale = scale
        out = torch.where(keep, x, 0.0)
        return out.mul_(scale) if scale != 1.0 else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        out = torch.where(keep, grad, 0.0)
        return out.mul_(ctx.scale) if ctx.scale != 1.0 else out, None, None


def dropout_on_cpu(x: torch.Tensor, p: float, rescale: bool = True) -> tuple[torch.Tensor, float]:
    """Dropout with p rounded to a multiple of 1/32768 (training mode). Returns the result and the
    keep-probability scale; with rescale=False the kept values are not multiplied by it (the
    caller folds it into a later multiplication)."""
    threshold = round(p * (1 << DROPOUT_BITS))
    if threshold <= 0:
        return x, 1.0
    if threshold >= 1 << DROPOUT_BITS:
        return x * 0.0, 1.0
    scale = (1 << DROPOUT_BITS) / ((1 << DROPOUT_BITS) - threshold)
    return _Dropout.apply(x, threshold, scale if rescale else 1.0), scale


class CheapDropout(nn.Dropout):
    """nn.Dropout whose CPU training path is `dropout_on_cpu`; elsewhere torch's own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.is_cheap_for(input):
            return super().forward(input)
        return dropout_on_cpu(input, self.p)[0]

    def is_cheap_for(self, input: torch.Tensor) -> bool:
        return self.training and self.p > 0.0 and input.device.type == "cpu" and not self.inplace


def use_cheap_dropout(model: nn.Module) -> int:
    """Switch every nn.Dropout of `model` (LoRA's input dropout included) to CheapDropout."""
    return switch_class(model, nn.Dropout, CheapDropout)


@functools.cache
def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """peft's LoRA Linear (same parameters, same names). In the plain case (one active adapter,
        not merged, no DoRA-like variant, no extra arguments) the adapter's output is added to the
        base output in one operation, `base + scale * B(A(dropout(x)))`, and on CPU the dropout's
        rescaling is folded into that scale instead of being a pass of its own. Anything else is
        peft's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = self._plain_adapter(args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout, scale = self.lora_dropout[name], self.scaling[name]
            result = self.base_layer(x)
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            if isinstance(dropout, CheapDropout) and dropout.is_cheap_for(h):
                h, keep_scale = dropout_on_cpu(h, dropout.p, rescale=False)
                scale = scale * keep_scale
            else:
                h = dropout(h)
            return torch.add(result, lora_b(lora_a(h)), alpha=scale).to(result.dtype)

        def _plain_adapter(self, args, kwargs) -> str | None:
            if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
                return None
            return name

    return FusedLoraLinear


def use_fused_lora(model: nn.Module) -> int:
    """Switch every peft LoRA Linear of `model` to FusedLoraLinear; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return switch_class(model, LoraLinear, _lora_linear_class())


# -------------------------------------------------------------------------------------- compile


class CompileUnavailable(RuntimeError):
    """torch.compile cannot generate code on this device (no C++ compiler on CPU, no Triton on GPU)."""


def check_can_compile(device: torch.device) -> None:
    """Raise CompileUnavailable, saying what is missing, where inductor could not build kernels."""
    if device.type == "cpu":
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(c) for c in compilers):
            raise CompileUnavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH, or CXX set")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise CompileUnavailable("torch.compile on CUDA needs Triton (`pip install triton`, shipped with CUDA torch)")


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


# ----------------------------------------------------------------------------------------- loss


# Rows of a logits chunk turned into probabilities at a time on the CPU: 8 rows of GPT-J's 50400
# fp32 logits (1.6 MB) stay in a core's L2 cache through max, exp and sum, where whole-chunk
# passes each stream the chunk through memory (2-4x slower here). Accelerators take the chunk in one.
CPU_SOFTMAX_ROWS = 8
PAD_ROWS = 256


def _logit_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn a chunk of logits, in place, into d(sum of cross-entropies)/d(logits) = softmax - one_hot
    and return the summed cross-entropy (fp32). 16-bit logits are exponentiated in fp32, and the
    target entries (p - 1, the largest) are computed from fp32 values, not from a 16-bit p."""
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    target_logits = logits[rows, targets].float()
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = CPU_SOFTMAX_ROWS if logits.device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        block = logits[start : start + step]
        x = block.float()  # a copy for 16-bit logits; the block itself (a view) for fp32
        block_lse = torch.logsumexp(x, dim=-1, keepdim=True)
        lse[start : start + step] = block_lse[:, 0]
        probabilities = x.sub_(block_lse).exp_()
        if probabilities.data_ptr() != block.data_ptr():
            block.copy_(probabilities)
    logits[rows, targets] = (torch.exp(target_logits - lse) - 1.0).to(logits.dtype)
    return (lse - target_logits).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ W.T + b, target), gradients computed chunk by chunk in forward.

    Each chunk's logits are made, turned into (softmax - one_hot) and multiplied straight back into
    the hidden-state and weight gradients, then dropped: peak extra memory is one chunk of logits
    instead of all of them, and nothing is recomputed in backward. `compute` is the matmuls' dtype:
    under autocast the 16-bit type, with the weight cast once per call (autocast would cast it for
    each of the chunk's products) and its gradient accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compute):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None  # made by the first chunk's product: no zero-filled vocab x hidden start
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n, device = hidden.shape[0], hidden.device
        with torch.autocast(device.type, enabled=False):
            w, h_all = weight.to(compute), hidden.to(compute)
            b = bias.to(compute) if bias is not None else None
            # 16-bit products on the CPU run on oneDNN, which keeps a plan, and memory with it, per
            # matrix shape: with a target count that differed each step, training held ~70 MB more
            # every step (GPT-J's head, 512 wide). There a chunk's rows are padded with zeros to a
            # multiple of PAD_ROWS, so a run meets a few shapes only.
            step = PAD_ROWS if device.type == "cpu" and compute.itemsize == 2 else 1
            rows = -(-min(chunk, n) // step) * step
            logits = torch.empty(rows, w.shape[0], dtype=compute, device=device)  # reused by every chunk
            padded = torch.zeros(rows, w.shape[1], dtype=compute, device=device) if step > 1 else None
            for start in range(0, n, chunk):
                h, t = h_all[start : start + chunk], targets[start : start + chunk]
                real = h.shape[0]
                if padded is not None:
                    h = padded[: -(-real // step) * step]
                    h[:real] = h_all[start : start + real]
                    h[real:] = 0
                grad = logits[: h.shape[0]]
                if b is None:
                    torch.mm(h, w.t(), out=grad)
                else:
                    torch.addmm(b, h, w.t(), out=grad)
                total += _logit_grad_(grad[:real], t)
                grad[real:] = 0  # padding rows: no loss, no gradient
                grad_hidden[start : start + real] = (grad @ w)[:real]
                if need_w and grad_weight is None:
                    grad_weight = (grad.t() @ h).float()
                elif need_w and grad_weight.dtype == grad.dtype:
                    grad_weight.addmm_(grad.t(), h)  # accumulated in place: no vocab x hidden temporary
                elif need_w:
                    grad_weight += (grad.t() @ h).float()
                if need_b:
                    # A product, not grad.sum(0): a column sum of 16-bit rows converts as it goes (8x slower).
                    grad_bias += (grad.new_ones(1, grad.shape[0]) @ grad)[0].float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_output.to(grad_hidden.dtype)
        # In place: the saved gradients are used once (the graph is not kept for a second backward).
        return (
            grad_hidden.mul_(scale),
            grad_weight.mul_(grad_output).to(w_dtype) if grad_weight is not None else None,
            grad_bias.mul_(grad_output).to(b_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(hidden, weight, bias, targets, chunk: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of cross-entropies of `hidden @ weight.T + bias` against `targets` (rows of hidden).
    Under autocast the products run in its 16-bit type, as an autocast `F.linear` would."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and DDP) whole
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, compute)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(device, enabled=False):
        w, b = weight.to(compute), bias.to(compute) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk].to(compute), w, b).float()
            total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


_request = threading.local()


@contextlib.contextmanager
def loss_from_head(labels: torch.Tensor, chunk: int = DEFAULT_CHUNK_TOKENS):
    """Inside this block a model whose head is a `LossHead` returns, as its `logits`, the summed
    next-token cross-entropy against `labels` (IGNORE excluded) instead of logits."""
    _request.value = (labels, chunk)
    try:
        yield
    finally:
        _request.value = None


class LossHead(nn.Linear):
    """The LM head (same parameters, same state-dict keys) that can return the loss instead of logits.

    The loss is computed inside the head's own forward so every engine sees an ordinary module
    call: DDP's and DeepSpeed's hooks run, and ZeRO-3 / FSDP have the weight gathered.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        request = getattr(_request, "value", None)
        if request is None or hidden_states.dim() != 3:
            return super().forward(hidden_states)
        labels, chunk = request
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked = hidden_states[:, :-1][keep]
        return fused_linear_cross_entropy(picked, self.weight, self.bias, targets[keep], chunk)


def use_loss_head(model: nn.Module) -> bool:
    """Make the output embedding of `model` a LossHead (in place; the same Parameter objects)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return False
    head.__class__ = LossHead
    return True
