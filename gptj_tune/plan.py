"""`gptj-tune plan`: the per-device memory a recipe needs (model states and activations) under each
backend, and which fit, before a GPU-hour is spent.

Model states follow DeepSpeed's own estimators for ZeRO (16-bit weights with fp32 master copy and
Adam moments: 18 bytes per parameter spread over the devices); activations follow Korthikanti et
al. (2022) per transformer layer (without the attention-score term under SDPA), plus the logits over
GPT-J's 50400-entry vocabulary: all of them with `train.loss: plain` (at 2048 tokens larger than a
layer's activations), one chunk with the fused loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ModelError, first_line
from .recipe import TINY_MODEL_NAME, Recipe

GIB = 1024**3
# GPT-J-6B's shape (transformers' GPTJConfig defaults are exactly GPT-J-6B): usable offline.
KNOWN_SHAPES = {"EleutherAI/gpt-j-6b": "gptj", "EleutherAI/gpt-j-6B": "gptj"}


@dataclass(frozen=True)
class Shape:
    params: int
    trainable: int
    largest_layer: int  # parameters of the largest single module (an embedding or a block's weights)
    block: int  # parameters of one transformer block (the unit ZeRO-3 / FSDP gathers)
    layers: int
    hidden: int
    heads: int
    vocab: int
    quantizable: int = 0  # weights of the linear layers a 4-bit base holds in 4 bits (all but the LM head)


@dataclass
class Estimate:
    setup: str
    states: float  # bytes per device
    activations: float
    notes: list[str] = field(default_factory=list)
    # Gradient bytes (within `states`) not alive while all of the activations are: with one
    # micro-batch a step on one process, backward frees each layer's activations as it makes that
    # layer's gradients, so the peak is the larger of the two, not their sum.
    freed: float = 0.0

    @property
    def total(self) -> float:
        """The peak: states, and the activations beyond the gradients they make way for."""
        return self.states + max(self.activations - self.freed, 0.0)


def model_shape(recipe: Recipe) -> Shape:
    """Parameter counts of the recipe's model and method, from its config on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPTJConfig

    m = recipe.model
    if m.name_or_path == TINY_MODEL_NAME:
        from .model.load import GPTJ_PADDED_VOCAB, tiny_gptj_config

        config = tiny_gptj_config(m, GPTJ_PADDED_VOCAB if m.tokenizer else m.tiny.vocab_size, 0)
    elif KNOWN_SHAPES.get(m.name_or_path) == "gptj":
        config = GPTJConfig()
    else:
        try:
            config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"plan: cannot read the config of {m.name_or_path!r} ({first_line(e)})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizable = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and name != "lm_head")  # fmt: skip
    from .model.methods import apply_method

    model = apply_method(model, recipe.method, gradient_checkpointing=False)
    params = [p for p in model.parameters()]
    blocks = [mod for mod in model.modules() if type(mod).__name__ in ("GPTJBlock", "GPTNeoBlock")]
    block = sum(p.numel() for p in blocks[0].parameters()) if blocks else 0
    largest = max([block] + [p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()])
    return Shape(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=largest,
        block=block,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        vocab=config.vocab_size,
        quantizable=quantizable,
    )


def blocks_compiled(recipe: Recipe) -> bool:
    """Whether the blocks run compiled on a GPU (train/setup.py `compiles`, for a CUDA device with Triton)."""
    if recipe.train.compile != "auto":
        return recipe.train.compile
    return recipe.distributed.backend not in ("deepspeed", "fsdp") and recipe.method.kind != "qlora"


def activation_bytes(recipe: Recipe, shape: Shape) -> float:
    """Activations kept for backward on one device, for one micro-batch."""
    b, s = recipe.train.batch_size, recipe.data.max_length
    h, a, n = shape.hidden, shape.heads, shape.layers
    e = 2 if recipe.computes_in_16_bits() else 4  # bytes per activation
    # Per layer, GPT-J keeps 15 values per token and hidden unit for backward (14.5 measured with
    # autograd's saved-tensor hooks on GPTJBlock with our one-kernel GELU; stock gelu_new, eight
    # separate operations, keeps 26.5). Eager attention also keeps its fp32 softmax (a·s² per row,
    # plus a 16-bit copy under bf16/fp16); SDPA keeps only a logsumexp, and the packing mask is
    # shared by all layers.
    eager = recipe.model.attn_implementation == "eager"
    per_layer = s * b * h * 15 * e + (a * s * s * b * (4 if e == 4 else 6) if eager else 0)
    mask = b * s * s * 4  # GPT-J's attention gets the block-causal mask also when a varlen kernel runs it
    method = recipe.method
    if method.kind == "qlora":  # bitsandbytes dequantizes one layer's weight at a time for its products
        per_layer_transient = 4 * h * h * e
    else:
        per_layer_transient = 0
    if method.kind in ("lora", "qlora") and method.dropout > 0:
        # peft keeps each adapted layer's dropped-out input (and its mask, a byte a value, unless
        # the blocks are compiled: inductor draws the mask again in backward from its seed) and the
        # rank-r output of A. Measured on CPU (bf16, r 16, width 256, tests/test_plan.py): 31.0 values
        # per token and hidden unit a layer eager, 26.2 compiled.
        mask = 0 if blocks_compiled(recipe) else 1
        inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "out_proj": h, "fc_in": h, "fc_out": 4 * h}
        targets = method.target_modules if isinstance(method.target_modules, list) else list(inputs)
        per_layer += sum(inputs.get(t, h) * s * b * (e + mask) + method.r * s * b * e for t in targets)
    layers = (n * s * b * h * e + per_layer) if recipe.model.gradient_checkpointing else n * per_layer
    # While a layer runs backward its gradients are alive too: the MLP's two 4h-wide ones and a few
    # h-wide ones, about 12 values per token and hidden unit (an estimate; the CPU check covers it).
    layers += s * b * h * 12 * e
    # Logits, their fp32 copy in the loss and its gradient: for every token with the plain loss, for
    # one chunk of target tokens with the fused one.
    tokens = b * s if recipe.train.loss == "plain" else min(recipe.train.loss_chunk_tokens, b * s)
    logits = tokens * shape.vocab * (e + 4 + 4)
    return layers + logits + mask + per_layer_transient


def state_bytes(recipe: Recipe, shape: Shape, setup: str, devices: int) -> float:
    """Weights, gradients and AdamW states on one device for `setup` (single, ddp, zero2, zero3,
    zero3-offload-optimizer, zero3-offload-all, fsdp, fsdp-offload)."""
    P, T, n = shape.params, shape.trainable, devices
    frozen = P - T
    w = 2 if recipe.model.weights_in_16_bits else 4
    # Trainable bytes per parameter besides its weight: gradient + Adam moments. Our AdamW keeps
    # moments in the parameter's dtype; DeepSpeed with 16-bit weights adds an fp32 master copy
    # (its 18 = 2 grad16 + 4 grad32 + 4 param32 + 8 Adam). LoRA adapters are fp32 (peft upcasts them),
    # and so is a soft prompt.
    fp32_trainables = recipe.method.kind != "full"
    t_w = 4 if fp32_trainables else w
    per_trainable = t_w + (t_w + 2 * t_w)  # weight + grad + m + v in the same dtype
    eight_bit = recipe.train.optimizer == "adamw_8bit"
    if eight_bit:  # m and v a byte each, with an fp32 scale per 256 of them (train/optim.py, _Blockwise8)
        per_trainable = t_w + t_w + 2 * (1 + 4 / 256)
    unit = 2 * shape.block * w  # one gathered block, and the next one prefetched
    if setup in ("single", "ddp"):
        kahan = 2 if t_w == 2 and (recipe.train.kahan_summation or eight_bit) else 0  # KahanAdamW's compensation (train/optim.py)
        if recipe.method.kind == "qlora":  # the blocks' linear weights in 4 bits (with their scales), the rest in w
            from .model.quantize import bytes_per_weight

            q = shape.quantizable
            return q * bytes_per_weight(recipe.method.double_quant) + (frozen - q) * w + T * per_trainable
        return frozen * w + T * (per_trainable + kahan)
    if setup.startswith("zero"):
        # DeepSpeed holds the weights in 16 bits whenever bf16/fp16 is on (weights or autocast).
        w = 2 if recipe.computes_in_16_bits() else 4
        frozen_bytes = frozen * w
        ds_trainable = 18 if (w == 2 and not fp32_trainables) else per_trainable
        if setup == "zero2":
            return P * w + T * (ds_trainable - w) / n if not fp32_trainables else frozen_bytes + T * per_trainable / n
        if setup == "zero3":
            return 4 * shape.largest_layer + (frozen_bytes + T * ds_trainable) / n
        if setup == "zero3-offload-optimizer":
            return 4 * shape.largest_layer + (frozen_bytes + T * t_w) / n
        return 4 * shape.largest_layer  # zero3-offload-all: weights and optimizer in CPU memory
    if setup == "fsdp":
        return unit + (frozen * w + T * per_trainable) / n
    if setup == "fsdp-offload":
        return unit
    raise ValueError(setup)


def gradients_made_in_backward(recipe: Recipe, shape: Shape) -> float:
    """On one process with one micro-batch a step (gradients set to None after each step), the
    gradient bytes that do not exist while the forward's activations all do: every trainable
    gradient but the largest layer's (the fused loss makes the LM head's during the forward).
    Measured on an H200 (GPT-J-6B full, bf16 + Kahan AdamW, 1 x 2048): peak 56.47 GiB, where
    states + activations would say 64.08 and this 56.35. Accumulated micro-batches keep all of it."""
    if recipe.train.grad_accum > 1:
        return 0.0
    w = 2 if recipe.model.weights_in_16_bits else 4
    t_w = w if recipe.method.kind == "full" else 4  # adapters and soft prompts are fp32
    largest = shape.largest_layer if recipe.method.kind == "full" else 0
    return max(shape.trainable - largest, 0) * t_w


def recipe_setup(recipe: Recipe) -> str:
    d = recipe.distributed
    if d.backend == "deepspeed":
        z = d.zero
        if z.config is not None:
            from .train.engines import deepspeed_config

            zero = deepspeed_config(recipe).get("zero_optimization", {})
            stage = zero.get("stage", 0)
            opt, par = "offload_optimizer" in zero, "offload_param" in zero
        else:
            stage, opt, par = z.zero_stage, z.offload_optimizer == "cpu", z.offload_params == "cpu"
        if stage == 2:
            return "zero2"
        return "zero3-offload-all" if par else "zero3-offload-optimizer" if opt else "zero3"
    if d.backend == "fsdp":
        return "fsdp-offload" if d.fsdp_settings.cpu_offload else "fsdp"
    return d.backend


SETUPS = ["single", "ddp", "zero2", "zero3", "zero3-offload-optimizer", "zero3-offload-all", "fsdp", "fsdp-offload"]


@dataclass(frozen=True)
class Plan:
    """Every setup's estimate for a recipe on `devices` devices of `device_gib` GiB each."""

    shape: Shape
    estimates: list[Estimate]
    own: str  # the recipe's own setup
    devices: int
    device_gib: float

    @property
    def own_estimate(self) -> Estimate:
        """The estimate for the recipe's own setup."""
        return next(e for e in self.estimates if e.setup == self.own)

    def fits(self, estimate: Estimate) -> bool:
        return estimate.total <= self.device_gib * GIB

    def refusal(self) -> str | None:
        """Why the recipe's own setup will not fit, with the setups that do (None: it fits)."""
        ours = self.own_estimate
        if self.fits(ours):
            return None
        fitting = [e.setup for e in self.estimates if self.fits(e)]
        advice = f"setups that fit: {', '.join(fitting)}" if fitting else (
            "nothing fits: lower train.batch_size or data.max_length, turn on model.gradient_checkpointing, use LoRA, "
            "or add devices")  # fmt: skip
        return (f"{self.own} needs {ours.total / GIB:.1f} GiB per device, {round(self.device_gib, 1):g} GiB available; {advice}")


def plan(recipe: Recipe, devices: int | None = None, device_gib: float = 80.0) -> Plan:
    """Estimates for every setup at `devices` (default: the recipe's world size), and the recipe's own."""
    shape = model_shape(recipe)
    devices = devices or recipe.distributed.world_size
    activations = activation_bytes(recipe, shape)
    skip = "single" if devices > 1 else "ddp"  # one device: no data parallelism; several: not one process
    # A soft prompt trains on single or ddp only (the recipe refuses sharding it does not need).
    adapters_only = recipe.prompt_slots() or recipe.method.kind == "qlora"  # (neither is sharded)
    setups = [s for s in SETUPS if s != skip and (not adapters_only or s in ("single", "ddp"))]
    estimates = [Estimate(setup, state_bytes(recipe, shape, setup, devices), activations,
                          freed=gradients_made_in_backward(recipe, shape) if setup == "single" else 0.0)
                 for setup in setups]  # fmt: skip
    own = recipe_setup(recipe)
    own = {"single": "ddp", "ddp": "single"}[own] if own == skip else own
    return Plan(shape, estimates, own, devices, device_gib)


def local_gpu() -> tuple[str, float] | None:
    """(name, GiB) of this machine's first CUDA GPU, or None without one: `plan`'s default device."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GIB


def preflight_warning(recipe: Recipe, device: torch.device) -> str | None:
    """Before a run loads its model onto a GPU: what `plan` says when the recipe will not fit that
    GPU's memory (an estimate, so a warning, not a refusal), else None. Nothing on CPUs, and nothing
    where the model's config cannot be read yet (loading it says why)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    try:
        planned = plan(recipe, device_gib=props.total_memory / GIB)
    except ModelError:
        return None
    return fit_warning(planned, props.name)


def fit_warning(planned: Plan, device_name: str) -> str | None:
    """The preflight warning for a plan made at a GPU's memory (None: it fits)."""
    refusal = planned.refusal()
    if refusal is None:
        return None
    return (f"this run will likely run out of memory on the {device_name}: `gptj-tune plan` estimates that {refusal}. "
            f"Stop now (Ctrl-C) and change the recipe, or let it run if you know it fits")  # fmt: skip
