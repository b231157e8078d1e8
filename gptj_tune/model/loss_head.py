"""The fused, chunked cross-entropy head: the loss over the target tokens only (prompt and padding
positions never reach the 50400-wide head), computed a chunk of tokens at a time, with the
gradient taken in the same pass, so fp32 logits for the whole batch never exist. Under bf16
autocast its products run in bf16 (the weight cast once, its gradient summed in fp32).

`model_loss(model, labels, ...)` is the call: the model's LM head (made a `LossHead` by
`use_loss_head`, same parameters and keys) computes the loss inside its own forward, so every
engine sees an ordinary module call: DDP's and DeepSpeed's hooks run, and ZeRO-3 / FSDP have the
head's weight gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokens import IGNORE

DEFAULT_CHUNK_TOKENS = 2048


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


class LossHead(nn.Linear):
    """The LM head (same parameters, same state-dict keys). While `targets` is set (by `model_loss`,
    for one forward) it returns the summed next-token cross-entropy against them instead of logits."""

    targets: tuple[torch.Tensor, int] | None = None  # (labels, chunk tokens)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.targets is None or hidden_states.dim() != 3:
            return super().forward(hidden_states)
        labels, chunk = self.targets
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked = hidden_states[:, :-1][keep]
        return fused_linear_cross_entropy(picked, self.weight, self.bias, targets[keep], chunk)


def use_loss_head(model: nn.Module) -> LossHead | None:
    """Make the output embedding of `model` a LossHead (in place; the same Parameter objects) and
    return it; None where the head is not a plain Linear."""
    head = model.get_output_embeddings()
    if type(head) is LossHead:
        return head
    if type(head) is not nn.Linear:
        return None
    head.__class__ = LossHead
    return head


def loss_heads_of(model: nn.Module) -> tuple[LossHead, ...]:
    """The LossHeads inside `model`, whatever wraps it (peft, DDP, DeepSpeed, a soft prompt): usually
    one; two where peft trains a copy of the head (`modules_to_save`) beside the frozen original;
    none before `use_loss_head`."""
    return tuple(m for m in model.modules() if isinstance(m, LossHead))


def model_loss(model: nn.Module, labels: torch.Tensor, chunk: int = DEFAULT_CHUNK_TOKENS,
               heads: tuple[LossHead, ...] | None = None, **inputs) -> torch.Tensor:  # fmt: skip
    """Sum of the next-token cross-entropies of `labels` (IGNORE excluded) under `model` called with
    `inputs`, computed by its LossHead (`heads`, else found in the model). The head's output, which
    the model hands back as its `logits`, is that sum: a 0-dim fp32 tensor."""
    heads = heads or loss_heads_of(model)
    if not heads:
        raise ValueError("the model has no LossHead: call use_loss_head on it first")
    for head in heads:
        head.targets = (labels, chunk)
    try:
        return model(**inputs).logits
    finally:
        for head in heads:
            head.targets = None
