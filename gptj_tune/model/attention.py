"""GPT-J's attention through torch's fused kernels, packing boundaries honoured: SDPA with the
block-causal mask, per packed example on a CPU, one variable-length FlashAttention call on a GPU.

transformers' GPT-J had only eager attention (Q and K upcast to fp32, the full attention matrix
materialised and kept for backward) and FlashAttention-2 (which ignores packing boundaries) until
5.24, which added SDPA over whole rows. Ours keeps GPT-J's projections and rotary embedding and
hands the product to `torch.nn.functional.scaled_dot_product_attention` with the same mask: through
the `_attn` method GPT-J had before 5.24, and from 5.24 as the attention function the switched
modules' view of the config names (`_OurAttentionConfig`). The attention modules change
class, not weights (`kernels.switch_class`): state-dict keys, saved configs and exported models are
exactly what stock transformers writes and reads (`eager`). A training step runs it within each
packed example (`mark_segments`), so the masked pairs are never computed. Tested equal to eager
(tests/model/test_attention.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import switch_class


ATTENTION_NAME = "gptj_tune"  # our attention function's name in transformers' AttentionInterface


@functools.cache
def _sdpa_class():
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    class GPTJSdpaAttention(GPTJAttention):
        """GPT-J attention through torch's scaled_dot_product_attention (flash / memory-efficient
        kernels where the device has them). Same inputs, same mask, same result within rounding."""

        def forward(self, *args, position_ids=None, **kwargs):
            if torch.compiler.is_compiling():  # compiled blocks: the segments are read outside the graph (`_attend`)
                return super().forward(*args, position_ids=position_ids, **kwargs)
            # The batch's packed examples travel on its position ids (`mark_segments`): a block that
            # gradient checkpointing recomputes in backward gets the same tensor, so it runs the same way.
            self._segments = getattr(position_ids, SEGMENTS, None)
            try:
                return super().forward(*args, position_ids=position_ids, **kwargs)
            finally:
                self._segments = None

        def _attn(self, query, key, value, attention_mask=None):
            # transformers < 5.24: GPT-J's forward calls this after its projections and rotary embedding
            return _attend(self, query, key, value, attention_mask, self.attn_dropout.p if self.training else 0.0), None

    return GPTJSdpaAttention


def _interface_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers >= 5.24: GPT-J's forward calls the config's attention function (see
    `_OurAttentionConfig`) with (batch, heads, L, head_dim) tensors and takes (batch, L, heads,
    head_dim) back."""
    return _attend(module, query, key, value, attention_mask, dropout, scaling).transpose(1, 2), None


def _attend(module, query, key, value, attention_mask, dropout_p: float, scale: float | None = None) -> torch.Tensor:
    """Attention of (batch, heads, L, head_dim) tensors, in that shape: per packed example where the
    batch's segments are marked, else one SDPA call under the mask. In a compiled block
    (`train.compile`) this runs outside the graph, with the segments `mark_segments` marked last:
    the graph is the same for every batch, and the packed examples still get the variable-length kernel."""
    if torch.compiler.is_compiling():
        return _attend_outside_the_graph(module, query, key, value, attention_mask, dropout_p, scale)
    return _attend_within(getattr(module, "_segments", None), module, query, key, value, attention_mask, dropout_p, scale)


@torch.compiler.disable
def _attend_outside_the_graph(module, query, key, value, attention_mask, dropout_p, scale) -> torch.Tensor:
    out = _attend_within(_marked_last, module, query, key, value, attention_mask, dropout_p, scale)
    # One memory layout whatever path ran, (batch, L, heads, head_dim) underneath (free for the
    # variable-length kernel's output): the graph after this call is guarded on its strides.
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _attend_within(segments, module, query, key, value, attention_mask, dropout_p: float, scale: float | None) -> torch.Tensor:
    q_len, k_len = query.shape[-2], key.shape[-2]
    if segments is not None and q_len == k_len == segments.length and query.shape[0] == len(segments.rows):
        value = value.to(query.dtype)
        kernel = varlen_kernel(query.device, getattr(module, "varlen", "torch"))
        if kernel is not None and kernel.takes(query, dropout_p):
            return _varlen_attention(query, key, value, segments, kernel, dropout_p)
        if query.device.type == "cpu":
            return _segmented_attention(query, key, value, segments, dropout_p)
        # no variable-length kernel for this device, dtype or dropout: the mask below
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
        attention_mask = attention_mask.to(query.dtype)  # eager's additive fp32 mask
    is_causal = False
    if attention_mask is None and q_len > 1:
        if q_len == k_len:
            is_causal = True
        else:  # new tokens after a cache: each sees the whole past and the new tokens before it
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(
        query, key, value.to(query.dtype), attn_mask=attention_mask,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale,
    )  # fmt: skip


class _OurAttentionConfig:
    """The model's config as our GPT-J attention modules see it (transformers >= 5.24, where GPT-J's
    attention calls the function its config's `_attn_implementation` names): every attribute read
    through to the model's own config, except that one, which names ours. The model's config keeps
    `eager`, so what `save_pretrained` writes is stock."""

    _attn_implementation = ATTENTION_NAME

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        if name == "_config":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


def _new_gptj_api() -> bool:
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    return not hasattr(GPTJAttention, "_attn")


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a packed example (or the padding tail) starts in each row: wherever the position
    does not follow the previous one. Shared by `Segments` and `block_causal_mask`."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (batch, 1, L, L): causal, and no token sees another segment.

    A segment starts wherever the position does not follow the previous one (positions restart per
    packed example and for the padding tail). Passed explicitly so correctness never depends on
    transformers' packed-sequence detection, which is skipped whenever a KV cache object exists.
    """
    segment = segment_starts(position_ids).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Segments:
    """Where each packed example starts and ends in each row of a batch (`segment_starts` of its
    position ids, the boundaries `block_causal_mask` keeps apart).

    One attention call per example pays when rows are not short and examples are not tiny: each
    call has a fixed cost that, on a CPU, outweighs the saved arithmetic of short examples.
    Measured per layer, forward and backward (2 threads, fp32), masked -> per example: 8 rows of
    512 tokens, 8 heads of 64, examples of 112 tokens 83 -> 44 ms, of 32 83 -> 41 ms; 8 rows of
    256, 4 heads of 32, examples of 32: 6.6 -> 6.6 ms; 2048 tokens, 16 heads of 256, examples of
    20: 892 -> 184 ms; but 16 rows of 128 tokens, examples of 16 (the quickstart): 3.4 -> 10.3 ms
    with 4 heads of 32. Hence `pays_off`: rows of at least MIN_WIDTH tokens whose examples average
    at least MIN_MEAN_LENGTH.
    """

    MIN_WIDTH = 256
    MIN_MEAN_LENGTH = 32

    def __init__(self, position_ids: torch.Tensor):
        self.length = position_ids.shape[1]
        self.rows = []
        for row in segment_starts(position_ids.cpu()):
            begin = row.nonzero().flatten().tolist()
            self.rows.append(list(zip(begin, begin[1:] + [self.length], strict=True)))
        self._cu: torch.Tensor | None = None  # cu_seqlens on the device that asked last

    @functools.cached_property
    def longest(self) -> int:
        return max(end - start for spans in self.rows for start, end in spans)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """Where each example starts with the rows laid end to end, then the total: int32 on
        `device`, made once per batch (every layer asks)."""
        if self._cu is None or self._cu.device != device:
            starts = [r * self.length + start for r, spans in enumerate(self.rows) for start, _ in spans]
            self._cu = torch.tensor(starts + [self.length * len(self.rows)], dtype=torch.int32).to(device)
        return self._cu

    @property
    def pays_off(self) -> bool:
        calls = sum(len(spans) for spans in self.rows)
        return self.length >= self.MIN_WIDTH and self.length * len(self.rows) >= self.MIN_MEAN_LENGTH * calls


SEGMENTS = "_gptj_tune_segments"  # the attribute of a batch's position ids that holds its Segments
_marked_last: Segments | None = None  # what compiled blocks read (they cannot read the attribute); see `_attend`


def mark_segments(
    position_ids: torch.Tensor, always: bool = False, use: bool = True, host: torch.Tensor | None = None
) -> Segments | None:
    """Make GPT-J's SDPA attention run causal attention within each packed example of this batch
    instead of over the whole row under the block-causal mask: the same result, without the work
    for the (masked) pairs of tokens from different examples. On a GPU that is one call to a
    variable-length FlashAttention kernel over all the batch's examples (`varlen_kernel`); on a CPU
    one SDPA call per example, and only for batches where that pays (`Segments.pays_off`, unless
    `always`). The segments are attached to the position-id tensor the model is called with, so a
    block recomputed in backward (gradient checkpointing) sees them too, on whatever thread autograd
    runs it. The mask is still passed to the model, so any attention that is not ours, or a case no
    kernel takes, stays correct. `host`: the same position ids on the CPU (the batch before it
    moved), read instead of `position_ids`, which on a GPU would cost a device-to-host wait for
    every micro-batch. Returns the segments, or None where the masked call is kept (always with
    `use` False). Compiled blocks read the segments marked last (a module global: the batch whose
    forward and backward run next); the attention checks they fit its shapes."""
    global _marked_last
    segments = Segments(position_ids if host is None else host) if use else None
    if segments is not None and not (always or position_ids.device.type != "cpu" or segments.pays_off):
        segments = None
    setattr(position_ids, SEGMENTS, segments)
    _marked_last = segments
    return segments


class VarlenKernel:
    """A causal variable-length attention function over packed examples laid end to end:
    q, k, v of shape (tokens, heads, head_dim), `cu_seqlens` the int32 start of every example and
    the end. From torch (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10, CUDA; no dropout)
    or from the flash-attn package (`flash_attn_varlen_func`)."""

    def __init__(self, call, dropout: bool):
        self._call, self.dropout = call, dropout

    def takes(self, query: torch.Tensor, dropout_p: float) -> bool:
        if query.dtype not in (torch.float16, torch.bfloat16) or (dropout_p > 0.0 and not self.dropout):
            return False
        return flash_runs(_capability(query.device), query.shape[-1], dropout_p, query.requires_grad)

    def __call__(self, q, k, v, cu_seqlens, max_length: int, dropout_p: float) -> torch.Tensor:
        return self._call(q, k, v, cu_seqlens, max_length, dropout_p)


def flash_runs(capability: tuple[int, int], head_dim: int, dropout_p: float, training: bool) -> bool:
    """Whether FlashAttention (torch's variable-length kernel, and flash-attn's) runs these inputs
    on a GPU of compute `capability`: Ampere (8.0) and newer, heads up to 256 wide, and for
    training on consumer Ampere and Ada (8.6, 8.9) and Blackwell workstation cards (12.0, 12.1) not
    heads in (192, 224], nor wider than 224 with dropout: PyTorch's own rules for its fused
    attention. GPT-J-6B's 256-wide heads without dropout run on all of them; a Turing or Volta card
    (T4, V100) takes the masked call instead, where the kernel would refuse the step."""
    if capability < (8, 0) or head_dim > 256:
        return False
    if training and capability in ((8, 6), (8, 7), (8, 9), (12, 0), (12, 1)):
        return not (192 < head_dim <= 224 or (head_dim > 224 and dropout_p > 0.0))
    return True


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def varlen_kernel(device: torch.device, source: str = "torch") -> VarlenKernel | None:
    """The variable-length kernel for packed rows on `device`, or None (CPUs; a GPU with neither
    torch's kernel nor flash-attn). `source` "flash_attn" (`attn_implementation:
    flash_attention_2`) takes the flash-attn package's; "torch" takes torch's own, else flash-attn's."""
    if device.type != "cuda":
        return None
    return _cuda_varlen_kernel(source)


@functools.cache
def _cuda_varlen_kernel(source: str) -> VarlenKernel | None:
    import inspect

    if source == "torch":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None:
            params = inspect.signature(varlen_attn).parameters
            # torch 2.10 takes is_causal; later versions a window, (-1, 0) being causal
            causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

            def torch_varlen(q, k, v, cu, length, dropout_p):
                return varlen_attn(q, k, v, cu, cu, length, length, **causal)

            return VarlenKernel(torch_varlen, dropout=False)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def flash_varlen(q, k, v, cu, length, dropout_p):
        return flash_attn_varlen_func(q, k, v, cu, cu, length, length, dropout_p=dropout_p, causal=True)

    return VarlenKernel(flash_varlen, dropout=True)


def _varlen_attention(query, key, value, segments: Segments, kernel: VarlenKernel, dropout_p: float) -> torch.Tensor:
    # (batch, heads, L, head_dim) -> the rows end to end, (batch*L, heads, head_dim). GPT-J's q, k
    # and v are permuted views of (batch, L, heads, head_dim) tensors: transposing back is free.
    b, h, length, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * length, h, d) for t in (query, key, value))
    out = kernel(q, k, v, segments.cu_seqlens(query.device), segments.longest, dropout_p)
    return out.view(b, length, h, d).transpose(1, 2)  # back to (batch, heads, L, head_dim): a view, no copy


def _segmented_attention(query, key, value, segments: Segments, dropout_p: float) -> torch.Tensor:
    # unbind/split, not slicing: their backward is one stack/cat, where each slice's backward would
    # allocate and fill a zero tensor the size of the whole batch (a cost that grows with the rows).
    rows = []
    for spans, q, k, v in zip(segments.rows, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        lengths = [e - s for s, e in spans]
        parts = [
            F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout_p, is_causal=True)[0]
            for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)
        ]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.stack(rows)


def use_sdpa_attention(model: nn.Module, varlen: str = "torch") -> int:
    """Switch every GPT-J attention module of `model` to SDPA; returns how many were switched.
    `varlen`: whose variable-length kernel runs packed rows on a GPU (see `varlen_kernel`)."""
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    switched = switch_class(model, GPTJAttention, _sdpa_class())
    if switched and _new_gptj_api():
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _interface_attention)
    for module in model.modules():
        if type(module) is _sdpa_class():
            module.varlen = varlen
            if _new_gptj_api() and not isinstance(module.config, _OurAttentionConfig):
                module.config = _OurAttentionConfig(module.config)
    return switched


def uses_our_attention(model: nn.Module) -> bool:
    return any(type(m) is _sdpa_class() for m in model.modules())
