"""Speed paths inside the blocks, each a class switch of existing modules (weights, state-dict keys
and saved configs stay stock), each tested equal to what it replaces (tests/model/test_kernels.py).
GELU is switched when a model is loaded (model/load.py), dropout and the LoRA add when it is set up
for training (train/loop.py). The attention is in model/attention.py, the loss head in
model/loss_head.py, regional torch.compile in model/compile.py.

- one-kernel GELU: GPT-J's and GPT-Neo's `gelu_new` is written as eight elementwise operations,
  each with its own pass over the 4*d_model-wide MLP activations and its own saved tensor;
  torch's `gelu(approximate="tanh")` is the same function in one kernel (equal within 3e-7).
- cheaper dropout on CPU (LoRA's input dropout): torch's CPU dropout draws one 32-bit random
  number per element; ours draws 15 random bits per element (four elements per 64-bit draw), so the
  drop probability is `p` rounded to a multiple of 1/32768 and the kept values are scaled by the
  exact inverse of the keep probability. On GPUs torch's fused dropout kernel is kept.
- fused LoRA add: peft adds an adapter's output as `base + B(A(dropout(x))) * scaling`, three
  passes over the output; ours is one `torch.add(base, B(A(h)), alpha=scale)`, with the CPU
  dropout's rescaling folded into `scale`. On a 16-bit base the adapter's products run in the
  base's dtype, the fp32 adapter weights cast for them (as autocast does): peft casts the input
  up to fp32 instead, a copy of every target's input, fp32 dropout and fp32 products (on an H200,
  ~50 of a 6B LoRA step's ~160 ms of kernels).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

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
            sixteen_bits = x.dtype in (torch.bfloat16, torch.float16)
            h = x if sixteen_bits else self._cast_input_dtype(x, lora_a.weight.dtype)
            if isinstance(dropout, CheapDropout) and dropout.is_cheap_for(h):
                h, keep_scale = dropout_on_cpu(h, dropout.p, rescale=False)
                scale = scale * keep_scale
            else:
                h = dropout(h)
            if sixteen_bits:  # products in the base's dtype; the cast's backward sums the fp32 gradients
                update = F.linear(F.linear(h, lora_a.weight.to(h.dtype)), lora_b.weight.to(h.dtype))
            else:
                update = lora_b(lora_a(h))
            return torch.add(result, update, alpha=scale).to(result.dtype)

        def _plain_adapter(self, args, kwargs) -> str | None:
            if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
                return None
            if self.lora_A[name].bias is not None or self.lora_B[name].bias is not None:  # peft's lora_bias
                return None
            return name

    return FusedLoraLinear


def use_fused_lora(model: nn.Module) -> int:
    """Switch every peft LoRA Linear of `model` to FusedLoraLinear; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return switch_class(model, LoraLinear, _lora_linear_class())
