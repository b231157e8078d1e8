"""Held-out metrics of a trained model: loss and perplexity on the recipe's held-out split, and greedy
generation on its held-out instruction prompts scored by exact match and ROUGE-L."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..data.templates import Template
from .targets import Target, load_target_model


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
    # A held-out conversation carries its prompt rendered with the chat template (data/chat.py).
    encoded = [tokenizer(r.get("prompt_text") or template.render_prompt(r["instruction"], r.get("input", "")),
                         add_special_tokens=False)["input_ids"] for r in records]  # fmt: skip
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
         "correct": answer == r["output"].strip(), **({"conversation": True} if "messages" in r else {})}
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


def held_out_metrics(target: Target, recipe, device: str, generate: bool = True) -> dict:
    """Loss and perplexity on the recipe's held-out split, masked and packed exactly as in training;
    then greedy generation on held-out prompts: exact match and ROUGE-L, with a sample."""
    from accelerate import Accelerator

    from ..data import prepare_data
    from ..data.batches import Batches
    from ..model.prompt_tuning import prompt_slots_of
    from ..train.step import evaluate_loss

    model, tokenizer = load_target_model(target, device)
    data = prepare_data(recipe.data, tokenizer, prompt_slots_of(model))  # a base model compared: no prompt slots
    batches = Batches(data.eval_rows, recipe.eval.batch_size or recipe.train.batch_size, tokenizer.pad_token_id, 0, shuffle=False)
    loss = evaluate_loss(model, batches, Accelerator(cpu=device == "cpu"))
    held_out_sha = hashlib.sha256(json.dumps(data.eval_records, sort_keys=True).encode()).hexdigest()[:16]
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50)) if loss is not None else None,
              "examples": data.eval_stats.examples, "target_tokens": data.eval_stats.target_tokens,
              "data_sha256": held_out_sha}  # fmt: skip
    records = data.eval_records[: recipe.eval.generate_samples or 100]
    if generate and records:
        scored = exact_match(model, tokenizer, data.template, records, recipe.eval.max_new_tokens)
        scores = [rouge_l(s["reference"], s["output"]) for s in scored.samples]
        result.update({"exact_match": scored.accuracy, "rouge_l": sum(scores) / len(scores), "generated": len(records),
                       "samples": scored.samples[:10]})  # fmt: skip
    return result
