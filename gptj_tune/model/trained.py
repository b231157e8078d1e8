"""A trained model loaded back from what a run or an export holds, for eval, generate and export."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError
from .prompt_tuning import SoftPromptModel, is_prompt_tuning_folder


def holds_trained_model(folder: Path) -> bool:
    """Whether `folder` holds what `load_trained_model` reads: a soft prompt, a LoRA adapter or a
    whole model (not, for one, a sharded engine checkpoint)."""
    return is_prompt_tuning_folder(folder) or (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def load_trained_model(base: str, weights: str | Path | None = None, dtype: torch.dtype | None = None,
                       quantized: dict | None = None, device: str | torch.device = "cpu"):  # fmt: skip
    """The model as trained: `weights` a soft prompt or a LoRA adapter (peft folders, put on `base`),
    or a whole model folder (config.json); None: `base` alone. `dtype` None loads as transformers
    does by default. `quantized` (`quantize.quantized_args` of a qlora run): the base in 4 bits as
    it trained, loaded onto `device` (a quantized model is not moved after loading)."""
    options = {} if dtype is None else {"dtype": dtype}
    if quantized is not None:
        from .quantize import one_layout_for_training_and_inference, quantized_loading_from_args

        options = quantized_loading_from_args(quantized, torch.device(device))
    model = _load(base, None if weights is None else Path(weights), options)
    if quantized is not None:
        one_layout_for_training_and_inference(model)
    return model


def _load(base: str, weights: Path | None, options: dict):
    from transformers import AutoModelForCausalLM

    if weights is None:
        return AutoModelForCausalLM.from_pretrained(base, **options)
    if is_prompt_tuning_folder(weights):
        return SoftPromptModel.from_saved(AutoModelForCausalLM.from_pretrained(base, **options), weights)
    if (weights / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **options), weights)
    if (weights / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(weights, **options)
    raise ModelError(f"{weights} holds no model (no config.json or adapter_config.json)")
