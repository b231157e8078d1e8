"""A 4-bit base for QLoRA (`method.kind: qlora`): bitsandbytes' NF4 or FP4 linear layers, loaded by
transformers' `from_pretrained`, adapters from peft on top (its `lora.bnb.Linear4bit`).

Why bitsandbytes: it is what transformers and peft integrate (a QLoRA adapter loads back with
`from_pretrained(..., quantization_config=...)` as its users expect), and its CPU backend runs
here: quantize, train and 8-bit optimizer states on the CI machines. torchao's NF4 (torchtune's
choice) was the alternative; torchao 0.18, the release at hand, no longer ships the
`torchao.dtypes.nf4tensor` module torchtune's QLoRA is built on.

What stays in 16 bits: the embedding, the LM head, the layer norms and biases (transformers'
default: only the blocks' linear weights are quantized). Products run in the model's dtype
(`model.dtype`: bf16 on a GPU), the adapters train in fp32.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ModelError

# Bytes a quantized weight takes: 4 bits, plus one fp32 scale per 64 weights, or with double
# quantization one 8-bit scale per 64 weights and an fp32 scale per 256 of those (QLoRA, 3.2).
BLOCK = 64


def bytes_per_weight(double_quant: bool) -> float:
    scales = (1 + 4 / 256) / BLOCK if double_quant else 4 / BLOCK
    return 0.5 + scales


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("method.kind qlora needs the bitsandbytes package: `pip install bitsandbytes` "
                         "(a dependency of gptj-tune; reinstall it with `pip install -e .`)")  # fmt: skip


def quantization_config(method, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the recipe's qlora method."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=method.quant_type, bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip


def quantized_loading(method, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained's arguments for a 4-bit base: the config, and the weights quantized straight
    onto `device` (a quantized model is not moved afterwards)."""
    where = device.index if device.type == "cuda" and device.index is not None else device.type
    return {"quantization_config": quantization_config(method, compute_dtype), "device_map": {"": where}}


def quantized_args(method, dtype: str) -> dict:
    """What a run's readers need to load its base as it trained (JSON: kept in eval's model args
    and an adapter export's gptj-tune.json): the 4-bit format and the products' dtype."""
    return {"quant_type": method.quant_type, "double_quant": method.double_quant, "dtype": dtype}


def quantized_loading_from_args(args: dict, device: torch.device) -> dict:
    """from_pretrained's arguments for a base described by `quantized_args`."""
    from types import SimpleNamespace

    from .load import DTYPES

    compute = DTYPES[args["dtype"]]
    method = SimpleNamespace(quant_type=args["quant_type"], double_quant=args["double_quant"])
    return {"dtype": compute, **quantized_loading(method, compute, device)}


def one_layout_for_training_and_inference(model) -> int:
    """Keep every 4-bit layer of `model` in the layout it trains in; returns how many layers.

    On a CPU with AVX-512 bf16, bitsandbytes re-packs a 4-bit weight for its inference kernel the
    first time the layer runs in eval mode without gradients, and keeps it so: the next training
    step then fails inside bitsandbytes (its packed path has no backward), and saving converts the
    weight back through bf16 scales, so the base the adapters train on would no longer be the one
    loaded. A run evaluates between training steps, and eval and export must score the model as it
    trained, so gptj-tune keeps one layout everywhere (bitsandbytes' own switch for that path)."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model) -> bool:
    """Whether some of `model`'s weights are bitsandbytes 4-bit ones."""
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules()
    )
