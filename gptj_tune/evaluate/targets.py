"""What `gptj-tune eval` and `generate` take as a target (a run directory, an exported or adapter
folder, a model name), resolved before any model work, and loaded as a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, RunDirError, first_line

@dataclass
class Target:
    """What `gptj-tune eval` evaluates: a run directory, an exported folder, or a model name."""

    label: str
    model_args: dict  # for lm-eval's HF model: pretrained (+ peft); `quantized`: a qlora run's 4-bit base
    run_dir: Path | None = None
    base: str | None = None  # the base model of a run (for the comparison column)


def resolve_target(target: str, checkpoint: str | None = None) -> Target:
    from ..recipe import load_recipe
    from ..rundir import RunDir, refuse_damaged, warn

    path = Path(target)
    if path.name == "final" and (path.parent / "recipe.yaml").is_file() and checkpoint is None:
        path = path.parent  # a run's final/ is that run: its recipe gives the held-out split and template
    if (path / "recipe.yaml").is_file():
        run = RunDir(path)
        recipe = load_recipe(run.recipe)
        folder = run.final if checkpoint in (None, "final") else run.checkpoint(checkpoint, warn=warn) / "model"
        if not folder.is_dir():
            raise RunDirError(f"{folder} does not exist: the run has no {'final model' if checkpoint in (None, 'final') else checkpoint} "
                              f"(finish it with `{run.resume_command()}`, or pick --checkpoint step-N)")  # fmt: skip
        if folder == run.final:
            refuse_damaged(folder)
        base = str(path / "base-model") if (path / "base-model").is_dir() else recipe.model.name_or_path
        if (folder / "adapter_config.json").is_file():
            args = {"pretrained": base, "peft": str(folder), "tokenizer": str(run.final if run.final.is_dir() else base)}
            if recipe.method.kind == "qlora":  # the base in 4 bits, as it trained
                from ..model.quantize import quantized_args

                args["quantized"] = quantized_args(recipe.method, recipe.model.dtype)
        elif (folder / "config.json").is_file():
            args = {"pretrained": str(folder), "tokenizer": str(run.final if run.final.is_dir() else base)}
        else:
            raise RunDirError(f"{folder} holds no model (no config.json or adapter_config.json); sharded checkpoints "
                              f"are evaluated after `gptj-tune export`")  # fmt: skip
        return Target(str(path), args, run_dir=path, base=base)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _adapter_target(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{path} is neither a run directory (no recipe.yaml) nor a model folder (no config.json)")
    if not path.exists():
        _check_model_name(target)
    return Target(target, {"pretrained": target})


def _adapter_target(folder: Path) -> Target:
    """A peft adapter folder (a run's final/, an --adapter-only export): on the base it names."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        base = None
    if not base:
        raise ModelError(f"{folder / 'adapter_config.json'} names no base model (base_model_name_or_path); evaluate "
                         f"the run directory or a merged export instead")  # fmt: skip
    if not Path(base).exists():
        _check_model_name(base)
    tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else base
    args = {"pretrained": base, "peft": str(folder), "tokenizer": tokenizer}
    try:  # an adapter exported from a qlora run names how its base was quantized
        quantized = json.loads((folder / "gptj-tune.json").read_text()).get("quantized")
    except (OSError, ValueError, AttributeError):
        quantized = None
    if quantized:
        args["quantized"] = quantized
    return Target(str(folder), args, base=base)


def _check_model_name(target: str) -> None:
    """A target that is no local folder must be a Hugging Face model name that loads: say so now,
    before any benchmark or model work, rather than with the hub client's message later."""
    if target.startswith((".", "/", "~")) or "\\" in target or target.count("/") > 1 or target.endswith("/"):
        raise ModelError(f"{target}: no such run directory or model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(target)
    except (OSError, ValueError) as e:
        raise ModelError(f"{target} is not a run directory or model folder here, and does not load as a Hugging Face "
                         f"model name ({first_line(e)})") from None  # fmt: skip


def load_target_model(target: Target, device: str):
    """The target as a model (base + peft adapter for a LoRA run, behind its soft prompt for a
    prompt-tuning run) and its tokenizer, on `device`, in eval mode."""
    from transformers import AutoTokenizer

    from ..model.trained import load_trained_model

    args = target.model_args
    quantized = args.get("quantized")
    model = load_trained_model(args["pretrained"], args.get("peft"), quantized=quantized, device=device)
    tokenizer = AutoTokenizer.from_pretrained(args.get("tokenizer", args["pretrained"]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if quantized else model.to(device)).eval(), tokenizer
