"""Records to token examples: prompt and response tokenized apart, prompt labels masked; raw text
cut into blocks.

Conventions every later stage relies on:
- an example is `input_ids` + `labels` of equal length; labels are IGNORE (-100) where no loss is
  taken (prompt tokens unless train_on_prompt; always the first token, which nothing predicts);
- every instruction example ends with EOS, which is a target, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .templates import Template

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def add(self, other: "TokenizeStats") -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def tokenize_instructions(
    records: list[dict], tokenizer, template: Template, max_length: int, train_on_prompt: bool, overlong: str
) -> tuple[list[Example], TokenizeStats]:
    """Prompt and response are tokenized separately, so the response start is exact."""
    eos = tokenizer.eos_token_id
    prompts = [template.render_prompt(r["instruction"], r.get("input", "")) for r in records]
    responses = [template.render_response(r["output"]) for r in records]
    prompt_ids = _encode(tokenizer, prompts)
    response_ids = _encode(tokenizer, responses)
    stats, examples = TokenizeStats(), []
    for p, r in zip(prompt_ids, response_ids):
        r = r + [eos]
        ids = p + r
        labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + r
        truncated = len(ids) > max_length
        if truncated and overlong == "drop":
            stats.dropped += 1
            continue
        ids, labels = ids[:max_length], labels[:max_length]
        labels[0] = IGNORE
        if all(label == IGNORE for label in labels):  # the prompt alone filled max_length
            stats.dropped += 1
            continue
        stats.truncated += truncated
        examples.append(Example(ids, labels))
    _count(stats, examples)
    return examples, stats


def tokenize_text(records: list[dict], tokenizer, max_length: int) -> tuple[list[Example], TokenizeStats]:
    """Documents joined with EOS and cut into max_length blocks; every token is a target."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in _encode(tokenizer, [r["text"] for r in records]):
        stream.extend(ids)
        stream.append(eos)
    examples = []
    for start in range(0, len(stream), max_length):
        block = stream[start : start + max_length]
        if len(block) >= 2:
            examples.append(Example(block, [IGNORE] + block[1:]))
    stats = TokenizeStats()
    _count(stats, examples)
    return examples, stats


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _count(stats: TokenizeStats, examples: list[Example]) -> None:
    stats.examples += len(examples)
    stats.tokens += sum(len(e.input_ids) for e in examples)
    stats.target_tokens += sum(sum(1 for x in e.labels if x != IGNORE) for e in examples)
