"""Tokenize records, mask prompt labels, pack or pad into rows, and serve batches by index.

Conventions every later stage relies on:
- an example is `input_ids` + `labels` of equal length; labels are -100 where no loss is taken
  (prompt tokens unless train_on_prompt; always the first token, which nothing predicts);
- every instruction example ends with EOS, which is a target, so the model learns to stop;
- a row holds one example (padding mode) or several (packing); `position_ids` restart at 0 for
  each example and for the padding tail, and the model's attention mask is built from them, so
  padding is masked by position, never by token id (GPT-J pads with EOS, which must be learned).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import torch

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


def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: returns bins of example indices, each summing to <= capacity.

    Deterministic: ties keep the original order. O(n log n) with a sorted list of free spaces.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free capacities that have at least one bin
    by_space: dict[int, list[int]] = {}
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the capacity {capacity}")
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left not in by_space:
            by_space[left] = []
            bisect.insort(spaces, left)
        by_space[left].append(b)
    return bins


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def make_rows(examples: list[Example], max_length: int, packing: bool) -> list[Row]:
    """One row per example, or packed rows of several examples with restarting positions."""
    if not packing:
        return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]
    rows = []
    for members in pack_examples([len(e.input_ids) for e in examples], max_length):
        members.sort()  # keep data order inside a row; it does not change the loss
        row = Row([], [], [])
        for i in members:
            e = examples[i]
            row.input_ids += e.input_ids
            row.labels += e.labels
            row.position_ids += range(len(e.input_ids))
        rows.append(row)
    return rows


def collate(rows: list[Row], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack rows into tensors, padding to `pad_to` (or the longest row). Padding is its own segment."""
    width = pad_to or max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)  # for token counts only, never for masking
    for j, r in enumerate(rows):
        n = len(r.input_ids)
        real[j, :n] = True
        ids[j, :n] = torch.tensor(r.input_ids)
        labels[j, :n] = torch.tensor(r.labels)
        positions[j, :n] = torch.tensor(r.position_ids)
        positions[j, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "real_tokens": real}


@dataclass
class Batches:
    """Rows served as batches by a global index, in a seeded order that changes each epoch.

    Batch `g` is fully determined by (rows, batch_size, seed, g), which is what makes a resumed run
    read exactly the batches an uninterrupted one would have.
    """

    rows: list[Row]
    batch_size: int
    pad_id: int
    pad_to: int | None
    seed: int
    shuffle: bool = True
    rank: int = 0  # with several processes, batch g of process r is device batch g * world + r
    world: int = 1
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def device_batches(self) -> int:
        """Batches of `batch_size` rows per epoch over all processes (the last one may be smaller)."""
        return -(-len(self.rows) // self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch for each process. With several processes an epoch's incomplete tail
        group is left out, so every process takes the same number of steps."""
        return self.device_batches if self.world == 1 else self.device_batches // self.world

    def epoch_of(self, index: int) -> int:
        return index // len(self)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(index, len(self))
        return self.device_batch(k * self.world + self.rank, epoch)

    def device_batch(self, j: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        order = self._order(epoch)
        chosen = order[j * self.batch_size : (j + 1) * self.batch_size]
        return collate([self.rows[i] for i in chosen], self.pad_id, self.pad_to)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is kept
        return self._orders[epoch]

    def __iter__(self):
        return (self.get(i) for i in range(len(self)))
