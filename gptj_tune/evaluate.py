"""Evaluation metrics of a trained model: greedy generation on held-out instruction prompts scored by
exact match and ROUGE-L, and what `gptj-tune eval` can evaluate (a run, an export, a model name)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.templates import Template


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)  # prompt, reference, output


# Prompt + new tokens held at once by one generate batch: bounds the KV cache (GPT-J-6B in bf16:
# 8,192 tokens x 28 layers x K and V x 4,096 x 2 bytes = 3.8 GB) and the logits.
GENERATE_TOKEN_BUDGET = 8192


@torch.no_grad()
def greedy_answers(model, tokenizer, template: Template, records: list[dict], max_new_tokens: int,
                   token_budget: int = GENERATE_TOKEN_BUDGET) -> list[str]:  # fmt: skip
    """The model's greedy response to each record's prompt, in order, cut at EOS and at the
    template's stop strings.

    Prompts with the same number of tokens are generated together, as many as fit in
    `token_budget`: rows of equal length need no padding, so each answer is the one the prompt gets
    alone (no pad positions, no shifted position ids), at a fraction of the calls.
    """
    encoded = [tokenizer(template.render_prompt(r["instruction"], r.get("input", "")), add_special_tokens=False)["input_ids"]
               for r in records]  # fmt: skip
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = [""] * len(records)
    for length, indices in by_length.items():
        per_batch = max(1, token_budget // (length + max_new_tokens))
        for start in range(0, len(indices), per_batch):
            batch = indices[start : start + per_batch]
            ids = torch.tensor([encoded[i] for i in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)  # fmt: skip
            for i, new in zip(batch, out[:, length:].tolist()):
                if eos is not None and eos in new:  # rows that finished early are padded after their EOS
                    new = new[: new.index(eos)]
                answers[i] = template.answer_in(tokenizer.decode(new, skip_special_tokens=True))
    return answers


def exact_match(model, tokenizer, template: Template, records: list[dict], max_new_tokens: int) -> ExactMatch:
    """Share of records whose greedy answer equals the reference (whitespace-trimmed)."""
    was_training = model.training
    model.eval()
    answers = greedy_answers(model, tokenizer, template, records, max_new_tokens)
    model.train(was_training)
    samples = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"], "output": answer,
         "correct": answer == r["output"].strip()}
        for r, answer in zip(records, answers)
    ]  # fmt: skip
    correct = sum(s["correct"] for s in samples)
    return ExactMatch(correct / max(len(records), 1), correct, len(records), samples)


def rouge_l(reference: str, output: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    a, b = reference.split(), output.split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(b), lcs / len(a)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------ targets


@dataclass
class Target:
    """What `gptj-tune eval` evaluates: a run directory, an exported folder, or a model name."""

    label: str
    model_args: dict  # for lm-eval's HF model: pretrained (+ peft)
    run_dir: Path | None = None
    base: str | None = None  # the base model of a run (for the comparison column)


def resolve_target(target: str, checkpoint: str | None = None) -> Target:
    from .errors import RunDirError
    from .recipe import load_recipe
    from .rundir import RunDir

    path = Path(target)
    if path.name == "final" and (path.parent / "recipe.yaml").is_file() and checkpoint is None:
        path = path.parent  # a run's final/ is that run: its recipe gives the held-out split and template
    if (path / "recipe.yaml").is_file():
        run = RunDir(path)
        recipe = load_recipe(run.recipe)
        folder = run.final if checkpoint in (None, "final") else run.checkpoint(checkpoint) / "model"
        if not folder.is_dir():
            raise RunDirError(f"{folder} does not exist: the run has no {'final model' if checkpoint in (None, 'final') else checkpoint} "
                              f"(finish it with `gptj-tune run {run.recipe} --resume`, or pick --checkpoint step-N)")  # fmt: skip
        base = str(path / "base-model") if (path / "base-model").is_dir() else recipe.model.name_or_path
        if (folder / "adapter_config.json").is_file():
            args = {"pretrained": base, "peft": str(folder), "tokenizer": str(run.final if run.final.is_dir() else base)}
        elif (folder / "config.json").is_file():
            args = {"pretrained": str(folder), "tokenizer": str(run.final if run.final.is_dir() else base)}
        else:
            raise RunDirError(f"{folder} holds no model (no config.json or adapter_config.json); sharded checkpoints "
                              f"are evaluated after `gptj-tune export`")  # fmt: skip
        return Target(str(path), args, run_dir=path, base=base)
    from .errors import ModelError

    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _adapter_target(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{path} is neither a run directory (no recipe.yaml) nor a model folder (no config.json)")
    if not path.exists():
        _check_model_name(target)
    return Target(target, {"pretrained": target})


def _adapter_target(folder: Path) -> Target:
    """A peft adapter folder (a run's final/, an --adapter-only export): on the base it names."""
    import json

    from .errors import ModelError

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
    return Target(str(folder), {"pretrained": base, "peft": str(folder), "tokenizer": tokenizer}, base=base)


def _check_model_name(target: str) -> None:
    """A target that is no local folder must be a Hugging Face model name that loads: say so now,
    before any benchmark or model work, rather than with the hub client's message later."""
    from .errors import ModelError

    if target.startswith((".", "/", "~")) or "\\" in target or target.count("/") > 1 or target.endswith("/"):
        raise ModelError(f"{target}: no such run directory or model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(target)
    except (OSError, ValueError) as e:
        raise ModelError(f"{target} is not a run directory or model folder here, and does not load as a Hugging Face "
                         f"model name ({str(e).splitlines()[0]})") from None  # fmt: skip
