"""The optimizer side of a step: AdamW (torch's fused kernel, or KahanAdamW for 16-bit weights),
clipping folded into that step, and the learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch.fx.experimental import _config as fx_config

from ..recipe import TrainSection
from .engines import is_deepspeed


def build_optimizer(model, train: TrainSection, master_weights_elsewhere: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters). Trainable weights held in
    16 bits get `KahanAdamW` (unless `train.kahan_summation` is off, or `master_weights_elsewhere`:
    DeepSpeed steps the optimizer on fp32 copies of its own)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hparams = dict(lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)
    if train.optimizer == "adamw_8bit":
        return KahanAdamW(groups, **hparams, state_bits=8)
    if train.kahan_summation and not master_weights_elsewhere and KahanAdamW.serves(decay + no_decay):
        return KahanAdamW(groups, **hparams)
    return torch.optim.AdamW(groups, **hparams, fused=_can_fuse(decay + no_decay))


_SIXTEEN_BITS = (torch.bfloat16, torch.float16)


def updates_round_away(optimizer: torch.optim.Optimizer) -> bool:
    """Whether plain AdamW updates 16-bit trainable weights here (small updates round to nothing)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, torch.optim.AdamW) and any(
        p.dtype in _SIXTEEN_BITS for group in inner.param_groups for p in group["params"]
    )


class KahanAdamW(torch.optim.Optimizer):
    """AdamW for weights stored in 16 bits that keeps the small updates plain AdamW rounds away.

    An Adam step moves a weight by about lr (2e-5 for Alpaca's full fine-tuning), while a GPT-J
    weight of 0.02 held in bf16 has neighbours 1.2e-4 apart: torch's AdamW on bf16 weights computes
    the new weight in fp32 and rounds it to the nearest bf16 value, which is the old weight. Here
    each 16-bit weight has a 16-bit compensation buffer that keeps what the rounding dropped (Kahan
    summation, as in torchdistx's AnyPrecisionAdamW): weight + compensation carry about 16
    significant bits, so small updates add up. Moments stay in the weight's dtype. Measured on a
    tiny GPT-J, 60 steps at lr 2e-5: torch's AdamW on bf16 weights moved 29% of them and its total
    update was 89% off the fp32 run's; this one 0.9% off, with the fp32 run's loss
    (tests/train/test_loop.py). Costs 2 bytes per trainable parameter. fp32 parameters get exactly
    torch's AdamW update. Like torch's fused AdamW it takes a `grad_scale` set before `step` (the
    gradients divided by it, for clipping without a pass of its own; see `clip_in_fused_step`).

    `fused` (default: on a GPU with Triton): each 16-bit weight is updated by one kernel that
    torch.compile generates from `_kahan_update` (read weight, gradient, moments and compensation
    once, write them once), instead of ~20 passes of fp32 chunks; weights of one shape are updated
    in batches, one compiled call each (`_batches`). On an H200 at the GPT-J-6B shape
    the chunked update took ~250 ms of a full fine-tuning step (benchmarks/results/history.md).
    Same arithmetic in fp32; results equal within one rounding (tests/train/test_optim.py).
    """

    # Elements computed in fp32 at once, in three reused fp32 buffers: on a CPU a chunk that stays in
    # the core's cache, so the ~20 passes below read cache, not memory (50M bf16 weights: 119 ms a
    # step against 589 ms in 16M-element chunks; torch's fused AdamW, without compensation, 27 ms);
    # on a GPU large chunks, for few kernel launches (3 x 64 MB of buffers).
    CPU_CHUNK, DEVICE_CHUNK = 1 << 17, 1 << 24

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None, state_bits: int = 16):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._scratch: dict[torch.device, torch.Tensor] = {}
        # state_bits 8 (`train.optimizer: adamw_8bit`): both moments of every weight in 8 bits,
        # blockwise (`_Blockwise8`); 16: in the weight's own dtype.
        self.state_bits = state_bits
        self.fused = fused if state_bits == 16 else False
        self._numbers_cache: dict[tuple, torch.Tensor] = {}  # the fused kernel's numbers, per group and step
        self._ones: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def serves(params: list[torch.Tensor]) -> bool:
        """Some trainable weights are 16-bit plain tensors (FSDP2's sharded DTensors are not taken)."""
        from torch.distributed.tensor import DTensor

        return any(p.dtype in _SIXTEEN_BITS for p in params) and not any(isinstance(p, DTensor) for p in params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        scale = getattr(self, "grad_scale", None)
        fused: dict[tuple, list] = {}  # weights for the one-kernel update, by what one compiled call can take together
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if self.state_bits == 8:
                        state.update(_Blockwise8.zeros(p))
                    else:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                _check_state_bits(state, self.state_bits)
                if p.dtype in _SIXTEEN_BITS and "compensation" not in state:  # also: resumed from plain AdamW's state
                    state["compensation"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                t = float(state["step"])
                hyper = (lr, b1, b2, eps, wd, 1 - b1**t, 1 - b2**t, scale)
                if "compensation" in state and p.is_contiguous() and self._fuses(p.device):
                    key = (p.device, p.dtype, p.grad.dtype, tuple(p.shape), hyper[:-1])
                    fused.setdefault(key, []).append((p, state))
                    continue
                weight = p.view(-1) if p.is_contiguous() else p.detach().contiguous().view(-1)  # (then copied back)
                grad = p.grad.reshape(-1)
                c = state["compensation"].view(-1) if "compensation" in state else None  # fp32 weights: none
                chunk = min(self.CPU_CHUNK if p.device.type == "cpu" else self.DEVICE_CHUNK, p.numel())
                if self.state_bits == 8:  # whole blocks of 8-bit states per chunk
                    chunk = max(_Blockwise8.BLOCK, chunk // _Blockwise8.BLOCK * _Blockwise8.BLOCK)
                buffers = self._buffers(p.device, chunk)
                for start in range(0, p.numel(), chunk):
                    part = slice(start, start + chunk)
                    m, v = self._moments(state, p.device, start, min(chunk, p.numel() - start))
                    _adamw_update(weight[part], grad[part], m, v, None if c is None else c[part], buffers, *hyper)
                if not p.is_contiguous():
                    p.copy_(weight.view_as(p))
        # Whole tensors, not flattened views (dynamo would guard on each view's base shape), and no
        # duck sizing (it would make a square weight's graph guard that its two sizes are equal).
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), fx_config.patch(use_duck_shape=False):
            for (device, *_, hyper), entries in fused.items():
                numbers = self._numbers(device, (*hyper, scale))
                for batch in _batches(entries):
                    _fused_kahan_updates()(*zip(*((p.detach(), p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"],
                                                   state["compensation"]) for p, state in batch)), *numbers)  # fmt: skip
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, but every state keeps the dtype it was saved in: torch casts floating states to
        the parameter's dtype, which would turn 8-bit codes into floats and round bf16 weights'
        fp32 block scales to bf16."""
        saved = {pid: {k: v for k, v in s.items() if k != "step" and torch.is_tensor(v)} for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params, strict=True):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(p.device)

    def _moments(self, state: dict, device: torch.device, start: int, n: int):
        """Where a chunk's two moments are read from and written back to."""
        if self.state_bits == 8:
            return _Blockwise8.of(state, "exp_avg", start, n, signed=True), _Blockwise8.of(state, "exp_avg_sq", start, n, signed=False)
        return (_Plain(state["exp_avg"].view(-1)[start : start + n]), _Plain(state["exp_avg_sq"].view(-1)[start : start + n]))

    def _fuses(self, device: torch.device) -> bool:
        if self.fused is None:
            from ..model.compile import CompileUnavailable, check_can_compile

            bf16 = any(p.dtype == torch.bfloat16 for group in self.param_groups for p in group["params"])
            try:
                check_can_compile(device, bf16)  # (a T4 or V100 cannot build bf16 kernels: the chunked passes)
                self.fused = device.type == "cuda"
            except CompileUnavailable:
                self.fused = False
        return self.fused

    def _numbers(self, device: torch.device, hyper: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The update's numbers as fp32 tensors on `device`, so the compiled kernel is built once and
        reads them (a Python float would be baked into the code, and rebuilt when the lr changes)."""
        lr, b1, b2, eps, wd, bc1, bc2, scale = hyper
        key = (device, lr, b1, b2, eps, wd, bc1, bc2)
        if key not in self._numbers_cache:
            if len(self._numbers_cache) >= 8:  # last step's: the lr or the bias corrections moved on
                self._numbers_cache.clear()
            values = torch.tensor([1 - b1, b2, 1 - b2, bc2, eps, 1 - lr * wd, lr / bc1], dtype=torch.float32)
            self._numbers_cache[key] = values.to(device, non_blocking=True)
        if scale is None:
            scale = self._ones.setdefault(device, torch.ones((), dtype=torch.float32, device=device))
        return self._numbers_cache[key], scale.float()

    def _buffers(self, device: torch.device, size: int) -> list[torch.Tensor]:
        scratch = self._scratch.get(device)
        if scratch is None or scratch.shape[1] < size:
            scratch = self._scratch[device] = torch.empty(3, size, dtype=torch.float32, device=device)
        return list(scratch)


class _Plain:
    """A chunk of a moment held as a tensor (the weight's dtype): read into fp32, written back."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def load(self, into: torch.Tensor) -> torch.Tensor:
        return into.copy_(self.values)

    def store(self, source: torch.Tensor) -> None:
        self.values.copy_(source)


class _Blockwise8:
    """A chunk of a moment held in 8 bits: bitsandbytes' blockwise dynamic quantization (each block of
    256 values scaled by its absmax, then mapped to the nearest of 256 codes spaced for a wide
    dynamic range; unsigned codes for the second moment, which is never negative), as its 8-bit
    optimizers keep their states. 1 byte a value plus 4 bytes a block."""

    BLOCK = 256

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor):
        self.codes, self.absmax, self.code = codes, absmax, code

    @classmethod
    def zeros(cls, p: torch.Tensor) -> dict:
        blocks = -(-p.numel() // cls.BLOCK)
        zeros = lambda n, dtype: torch.zeros(n, dtype=dtype, device=p.device)  # noqa: E731
        # absmax 0: every value reads as 0 whatever its code
        return {"exp_avg": zeros(p.numel(), torch.uint8), "exp_avg_absmax": zeros(blocks, torch.float32),
                "exp_avg_sq": zeros(p.numel(), torch.uint8), "exp_avg_sq_absmax": zeros(blocks, torch.float32)}  # fmt: skip

    @classmethod
    def of(cls, state: dict, name: str, start: int, n: int, signed: bool) -> _Blockwise8:
        first, blocks = start // cls.BLOCK, -(-n // cls.BLOCK)
        return cls(state[name][start : start + n], state[name + "_absmax"][first : first + blocks], _dynamic_code(signed, state[name].device))

    def load(self, into: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_blockwise

        # (no `out=` here: bitsandbytes' CPU backend has no such kernel)
        return into.copy_(dequantize_blockwise(self.codes, absmax=self.absmax, code=self.code, blocksize=self.BLOCK))

    def store(self, source: torch.Tensor) -> None:
        from bitsandbytes.functional import quantize_blockwise

        _, quant = quantize_blockwise(source, code=self.code, blocksize=self.BLOCK, out=self.codes)
        self.absmax.copy_(quant.absmax)


@functools.cache
def _dynamic_code(signed: bool, device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=signed).to(device)


def _check_state_bits(state: dict, bits: int) -> None:
    """A checkpoint's optimizer states must be the kind this run keeps."""
    eight = state["exp_avg"].dtype == torch.uint8
    if eight != (bits == 8):
        from ..errors import TrainingError

        saved, asked = ("adamw_8bit", "adamw") if eight else ("adamw", "adamw_8bit")
        raise TrainingError(f"the checkpoint's optimizer states are {saved}'s, this recipe's train.optimizer is {asked}: "
                            f"resume with train.optimizer: {saved}, or start a new run")  # fmt: skip


def _adamw_update(w, g, m, v, c, buffers, lr, b1, b2, eps, wd, bc1, bc2, scale) -> None:
    """One AdamW update of a chunk of weights `w`, in place with its moments `m` and `v` (`_Plain` or
    `_Blockwise8`), computed in fp32 in `buffers`; `c`: a 16-bit weight's compensation, what rounding
    it has dropped so far (None for fp32 weights, which are then updated exactly as torch's AdamW does)."""
    n = w.numel()
    g32, m32, v32 = (b[:n] for b in buffers)
    g32.copy_(g)
    if scale is not None:
        g32.div_(scale)
    m.load(m32).lerp_(g32, 1 - b1)
    m.store(m32)
    v.load(v32).mul_(b2).addcmul_(g32, g32, value=1 - b2)
    v.store(v32)
    denominator = v32.div_(bc2).sqrt_().add_(eps)
    exact = g32.copy_(w.reshape(-1))  # the weight as it would be without rounding
    if c is not None:
        exact.add_(c)
    if wd:
        exact.mul_(1 - lr * wd)
    exact.addcdiv_(m32, denominator, value=-lr / bc1)
    w.copy_(exact.view_as(w))  # a 16-bit weight: rounded to the nearest 16-bit value
    if c is not None:
        c.copy_(exact.sub_(w.reshape(-1)))  # and what that rounding dropped


def _kahan_update(w, g, m, v, c, numbers, grad_scale) -> None:
    """`_adamw_update` of a 16-bit weight as one expression over whole tensors, for torch.compile to
    make one kernel of: `numbers` holds (1-b1, b2, 1-b2, bias correction 2, eps, 1 - lr*wd, lr / bias
    correction 1), `grad_scale` the clip's divisor (or 1)."""
    g32 = g.float() / grad_scale
    m32 = torch.lerp(m.float(), g32, numbers[0])
    v32 = v.float() * numbers[1] + g32 * g32 * numbers[2]
    denominator = (v32 / numbers[3]).sqrt() + numbers[4]
    exact = (w.float() + c.float()) * numbers[5] - m32 / denominator * numbers[6]
    rounded = exact.to(w.dtype)
    m.copy_(m32)
    v.copy_(v32)
    w.copy_(rounded)
    c.copy_(exact - rounded.float())


def _kahan_updates(ws, gs, ms, vs, cs, numbers, grad_scale) -> None:
    """`_kahan_update` of several weights of one shape in one compiled call (horizontal fusion): one
    call from Python launches the kernels of all of them."""
    for w, g, m, v, c in zip(ws, gs, ms, vs, cs, strict=True):
        _kahan_update(w, g, m, v, c, numbers, grad_scale)


# How many weights one compiled call updates: the weights of one shape are cut into batches of these
# sizes, so few graphs are ever compiled (one per batch size and number of dimensions, within
# dynamo's recompile limit) and GPT-J-6B's 285 weights take 25 calls instead of 285. On an H200 at
# the 28df474 full profile, with one call a weight, the GPU idled ~95 ms of a 204 ms step.
_BATCH_SIZES = (16, 8, 4, 2, 1)
# Graphs of the batched update dynamo may keep (its default, 8, is for all of a function's graphs):
# one per batch size and number of dimensions, and more for sizes dynamo specialises on (a
# dimension of 1; on a CPU, small sizes). Past it, the update would silently run uncompiled.
_RECOMPILE_LIMIT = 32


def _batches(entries: list) -> list[list]:
    """`entries` (weights of one shape, dtype and step) cut into batches of `_BATCH_SIZES`."""
    out, start = [], 0
    for size in _BATCH_SIZES:
        while len(entries) - start >= size:
            out.append(entries[start : start + size])
            start += size
    return out


@functools.cache
def _fused_kahan_updates():
    # dynamic: one graph per batch size and number of dimensions, whatever the weights' sizes. emulate_precision_casts: inductor otherwise keeps
    # `exact.to(bf16).float()` in fp32, which makes the compensation zero and the update plain
    # AdamW's rounded one.
    return torch.compile(_kahan_updates, dynamic=True, options={"emulate_precision_casts": True})


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all parameters; on CPU 5x faster than the per-parameter
    loop for GPT-J's 50400-row embedding and head) takes plain CPU/CUDA float tensors; FSDP2's
    sharded DTensor parameters keep the default implementation."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )


def clip_in_fused_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Gradient clipping for torch's fused AdamW without a pass over the gradients: the total norm
    is measured, and the step divides every gradient by max(1, norm / max_norm) inside its one
    kernel (the `grad_scale` a GradScaler hands the fused optimizers), instead of clipping
    multiplying them all in place first. Returns the norm before clipping, like
    `clip_grad_norm_`. Call `optimizer.step()` next; it uses the scale once."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    return norm


def step_takes_the_clip(optimizer, accelerator) -> torch.optim.Optimizer | None:
    """The torch optimizer to hand clipping to, when it is fused AdamW or KahanAdamW and nothing else
    scales its gradients (no fp16 GradScaler, not DeepSpeed, whose engine clips); DDP's gradients are
    already averaged over processes when the step runs, so their norm is the global one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not (isinstance(inner, KahanAdamW) or isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")):
        return None
    return inner if getattr(optimizer, "scaler", None) is None and not is_deepspeed(accelerator) else None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(train: TrainSection, total: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return int(round((train.warmup_ratio if train.warmup_ratio is not None else 0.03) * total))


def warmup_warning(warmup: int, total: int) -> str | None:
    """Why a warmup as long as the run is worth a line: the learning rate never reaches train.lr."""
    if warmup < total or total == 0:
        return None
    return (f"the warmup's {warmup} steps are not fewer than this run's {total} optimizer steps, so the learning rate "
            f"only warms up and ends at {total / (warmup + 1):.0%} of train.lr; set train.warmup_steps below {total} "
            f"(or a smaller train.warmup_ratio)")  # fmt: skip
