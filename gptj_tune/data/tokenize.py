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
    """Bins of example indices, each summing to <= capacity: best-fit decreasing, then bins dissolved
    while their examples can be moved into the others' free space (`_dissolve_bins`).

    Deterministic: ties keep the original order.
    """
    bins = _best_fit_decreasing(lengths, capacity)
    return _dissolve_bins(bins, lengths, capacity)


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """O(n log n) with a sorted list of free spaces."""
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


def _dissolve_bins(bins: list[list[int]], lengths: list[int], capacity: int, budget: int = 2_000_000) -> list[list[int]]:
    """Move the examples of the least-filled bin into the others' free space, and repeat while a
    whole bin can be emptied that way.

    Best-fit decreasing leaves most bins a few tokens short (no example left was short enough for
    the gap) and a last, part-empty bin of the shortest examples. An example of that bin goes into
    a bin with room for it; or into the roomiest bin R after R has traded examples for shorter
    ones from bins with room for the difference, until its gap is large enough (`_make_room`).
    A bin that cannot be emptied is left as it was. `budget` caps the work
    (example visits), so very large datasets keep what is done by then (they lose little: the
    tail is a small part of them).
    """
    bins = [list(b) for b in bins]
    fill = [sum(lengths[i] for i in b) for b in bins]
    while len(bins) > 1 and capacity * len(bins) - sum(fill) >= capacity and budget > 0:
        t = min(range(len(bins)), key=lambda k: (fill[k], -k))
        saved = [list(b) for b in bins], list(fill)
        for item in sorted(bins[t], key=lambda i: (-lengths[i], i)):
            n = lengths[item]
            target = None
            room = [(capacity - fill[k], k) for k in range(len(bins)) if k != t and capacity - fill[k] >= n]
            if room:
                target = min(room)[1]
            else:
                target, budget = _make_room(bins, fill, lengths, capacity, t, n, budget)
            if target is None:
                break
            bins[t].remove(item)
            bins[target].append(item)
            fill[t] -= n
            fill[target] += n
        if bins[t]:  # could not empty it: keep the packing as it was before trying
            bins, fill = saved
            break
        del bins[t], fill[t]
    return bins


def _make_room(bins, fill, lengths, capacity, t, n, budget, tries: int = 32) -> tuple[int | None, int]:
    """Grow the free space of a bin R (not t) to n tokens by trading its examples for shorter ones
    from bins S that have room for the difference (each trade moves free space from S to R: the
    smallest trade that is enough, else the largest). The `tries` roomiest bins are tried as R in
    turn; a failed try is undone. Returns R, or None, and the budget left."""
    others = [k for k in range(len(bins)) if k != t]
    for r_bin in sorted(others, key=lambda k: (fill[k], k))[:tries]:
        trades = []
        while (need := n - (capacity - fill[r_bin])) > 0 and budget > 0:
            best = None  # (delta, r, s_bin, s)
            for s_bin in others:
                gap = capacity - fill[s_bin]
                if s_bin == r_bin or gap == 0:
                    continue
                budget -= len(bins[s_bin]) * len(bins[r_bin])
                for r in bins[r_bin]:
                    for s in bins[s_bin]:
                        delta = lengths[r] - lengths[s]
                        if 0 < delta <= gap and (best is None or _better_trade(delta, best[0], need)):
                            best = (delta, r, s_bin, s)
            if best is None:
                break
            trades.append(best)
            _trade(bins, fill, r_bin, *best)
        if n <= capacity - fill[r_bin]:
            return r_bin, budget
        for delta, r, s_bin, s in reversed(trades):  # undo: trade back
            _trade(bins, fill, r_bin, -delta, s, s_bin, r)
        if budget <= 0:
            break
    return None, budget


def _trade(bins, fill, r_bin, delta, r, s_bin, s) -> None:
    """Example r leaves bin r_bin for s_bin, s the other way; delta = len(r) - len(s)."""
    bins[r_bin].remove(r), bins[s_bin].remove(s)
    bins[r_bin].append(s), bins[s_bin].append(r)
    fill[r_bin] -= delta
    fill[s_bin] += delta


def _better_trade(delta: int, best: int, need: int) -> bool:
    if (delta >= need) != (best >= need):
        return delta >= need
    return delta < best if delta >= need else delta > best


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
    """Rows served as batches by a global index, in a seeded order that changes each epoch; each
    batch is as wide as its longest row (packed rows are rarely short, so little is padded).

    Batch `g` is fully determined by (rows, batch_size, seed, g), which is what makes a resumed run
    read exactly the batches an uninterrupted one would have.
    """

    rows: list[Row]
    batch_size: int
    pad_id: int
    seed: int
    shuffle: bool = True
    rank: int = 0  # with several processes, batch g of process r is device batch g * world + r
    world: int = 1
    width_multiple: int = 1  # widths rounded up to a multiple of this (fewer distinct matrix shapes)
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
        rows = [self.rows[i] for i in order[j * self.batch_size : (j + 1) * self.batch_size]]
        longest = max(len(r.input_ids) for r in rows)
        return collate(rows, self.pad_id, pad_to=-(-longest // self.width_multiple) * self.width_multiple)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is kept
        return self._orders[epoch]

    def __iter__(self):
        return (self.get(i) for i in range(len(self)))
