"""Training methods: full fine-tuning, LoRA adapters through peft on a frozen base (QLoRA: the same on
a 4-bit base, loaded by model/quantize.py), or a soft prompt (prompt tuning, model/prompt_tuning.py)
in front of a frozen model."""

from __future__ import annotations

from ..recipe import FullMethod, LoraMethod, PromptTuningMethod
from .load import check_targets, lora_targets
from .prompt_tuning import SoftPromptModel, initial_prompt


def apply_method(model, method: FullMethod | LoraMethod | PromptTuningMethod, gradient_checkpointing: bool = False,
                 tokenizer=None, seed: int = 0):  # fmt: skip
    """Return the model to train: itself for `full`, a peft model for `lora`, a SoftPromptModel for
    `prompt_tuning` (whose `init_text` needs the tokenizer)."""
    if isinstance(method, FullMethod):
        model.requires_grad_(True)
        return model
    if isinstance(method, PromptTuningMethod):
        return SoftPromptModel(model.requires_grad_(False), initial_prompt(model, method, tokenizer, seed))
    import peft

    targets = method.target_modules or lora_targets(model.config.model_type)
    if isinstance(method.target_modules, list):
        check_targets(model, method.target_modules, "method.target_modules")
    if method.modules_to_save:
        check_targets(model, method.modules_to_save, "method.modules_to_save")
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        bias=method.bias,
        modules_to_save=method.modules_to_save or None,
    )
    if gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph alive.
        model.enable_input_require_grads()
    return peft.get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    def size(p):  # under ZeRO-3 a parameter's local shard is empty; ds_numel is its real size
        quant_state = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight packs two in a byte
        if quant_state is not None:
            return quant_state.shape.numel()
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total
