"""Packing: examples into rows of at most max_length tokens (best-fit decreasing, then the emptiest
rows dissolved into the others' free space), or one example per row.

In a packed row `position_ids` restart at 0 for each example, and the model's attention mask is
built from them, so no token attends across an example boundary (see model/attention.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .tokens import Example


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
