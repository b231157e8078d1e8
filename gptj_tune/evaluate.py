"""Evaluation of a trained model. For now: greedy generation on held-out instruction prompts, scored
by exact match (the measure that shows the quickstart learned its demo tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data.templates import Template


@dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)  # prompt, reference, output


@torch.no_grad()
def greedy_answer(model, tokenizer, template: Template, instruction: str, input: str, max_new_tokens: int) -> str:
    """The model's greedy response to one prompt, cut at EOS or a template stop string."""
    prompt_ids = tokenizer(template.render_prompt(instruction, input), add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
    for stop in template.stop:
        text = text.split(stop)[0]
    return text.strip()


def exact_match(model, tokenizer, template: Template, records: list[dict], max_new_tokens: int) -> ExactMatch:
    """Share of records whose greedy answer equals the reference (whitespace-trimmed)."""
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    for r in records:
        answer = greedy_answer(model, tokenizer, template, r["instruction"], r.get("input", ""), max_new_tokens)
        ok = answer == r["output"].strip()
        correct += ok
        samples.append({"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"], "output": answer, "correct": ok})
    model.train(was_training)
    return ExactMatch(correct / max(len(records), 1), correct, len(records), samples)
