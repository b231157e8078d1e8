"""Packing: examples into rows of at most max_length tokens (best-fit decreasing, then the emptiest
rows dissolved into the others' free space), or one example per row.

Packing works on an array of example lengths and returns rows as index arrays (`row_starts`,
`members`: row i holds examples members[row_starts[i]:row_starts[i + 1]]), so ten million examples
pack in seconds and no token is touched. In a packed row `position_ids` restart at 0 for each
example, and the model's attention mask is built from them, so no token attends across an example
boundary (see model/attention.py).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass

import numpy as np

from .tokens import Example


def pack_lengths(lengths, capacity: int, budget: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Rows of example indices, each summing to <= capacity: best-fit decreasing, then rows dissolved
    while their examples can be moved into the others' free space (`_Bins.dissolve`). Examples keep
    data order inside a row. Deterministic: ties keep the original order.

    Returns (row_starts, members), both int64; row_starts has one entry more than there are rows."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    bins = _Bins.best_fit_decreasing(lengths, capacity)
    bins.dissolve(budget)
    return bins.as_rows()


def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """`pack_lengths` as lists of example indices, one list per row."""
    starts, members = pack_lengths(lengths, capacity)
    return [members[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing alone (what dissolving rows improves on), as lists of indices."""
    bins = _Bins.best_fit_decreasing(np.asarray(lengths, dtype=np.int64), capacity)
    starts, members = bins.as_rows()
    return [members[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


class _FreeSpace:
    """Bins by free space: a sorted list of the distinct free spaces and, for each, its bins (a
    dict, in the order they got there) with a heap of their ids for the lowest one (entries of
    bins that left are dropped when they reach the top)."""

    def __init__(self):
        self.spaces: list[int] = []
        self.bins: dict[int, dict[int, None]] = {}
        self._heaps: dict[int, list[int]] = {}

    def add(self, space: int, bins) -> None:
        if space not in self.bins:
            self.bins[space] = {}
            bisect.insort(self.spaces, space)
        self.bins[space].update(dict.fromkeys(bins))
        if space in self._heaps:  # built by the first `lowest` call for this space
            for b in bins:
                heapq.heappush(self._heaps[space], b)

    def remove(self, space: int, b: int) -> None:
        group = self.bins[space]
        del group[b]
        if not group:
            del self.bins[space]
            self._heaps.pop(space, None)
            self.spaces.pop(bisect.bisect_left(self.spaces, space))

    def lowest(self, space: int, exclude: int = -1) -> int | None:
        """The lowest bin id with this free space, other than `exclude`."""
        group = self.bins[space]
        if space not in self._heaps:
            self._heaps[space] = list(group)
            heapq.heapify(self._heaps[space])
        heap = self._heaps[space]
        while heap[0] not in group:
            heapq.heappop(heap)
        if heap[0] != exclude:
            return heap[0]
        top = heapq.heappop(heap)
        while heap and heap[0] not in group:
            heapq.heappop(heap)
        found = heap[0] if heap else None
        heapq.heappush(heap, top)
        return found

    def tightest(self, n: int, exclude: int = -1) -> int | None:
        """The lowest-numbered bin with the least free space that is at least n (not `exclude`)."""
        k = bisect.bisect_left(self.spaces, n)
        while k < len(self.spaces):
            b = self.lowest(self.spaces[k], exclude)
            if b is not None:
                return b
            k += 1
        return None


class _Bins:
    def __init__(self, lengths: np.ndarray, capacity: int, bin_of: np.ndarray, n_bins: int):
        self.lengths, self.capacity = lengths, capacity
        fill = np.bincount(bin_of, weights=lengths, minlength=n_bins).astype(np.int64)
        self.fill = fill.tolist()
        self.alive = np.ones(n_bins, bool)
        self.n_alive = n_bins
        self.bin_of = bin_of
        order = np.argsort(bin_of, kind="stable")
        self._order, self._starts = order, np.searchsorted(bin_of[order], np.arange(n_bins + 1))
        self._members: dict[int, list[int]] = {}  # bins whose members changed or were read, as lists
        self.free = _FreeSpace()
        by_space = np.argsort(capacity - fill, kind="stable")
        spaces = (capacity - fill)[by_space]
        edges = np.concatenate(([0], np.flatnonzero(np.diff(spaces)) + 1, [n_bins])).tolist()
        for a, b in zip(edges[:-1], edges[1:]):
            self.free.add(int(spaces[a]), by_space[a:b].tolist())

    @classmethod
    def best_fit_decreasing(cls, lengths: np.ndarray, capacity: int) -> _Bins:
        """Best-fit decreasing, a run of equal lengths at a time: the bins of the tightest free
        space s >= L each take s // L examples of length L in turn, exactly as one at a time would."""
        over = np.flatnonzero(lengths > capacity)
        if len(over):
            raise ValueError(f"example {over[0]} has {lengths[over[0]]} tokens, more than the capacity {capacity}")
        key = -lengths.astype(np.int16 if capacity < 1 << 15 else np.int32)  # 16 bits: numpy's stable sort is a radix sort
        order = np.argsort(key, kind="stable")
        sorted_len = lengths[order]
        bin_of_sorted = np.empty(len(lengths), np.int64)
        free = _FreeSpace()
        n_bins = 0
        edges = np.concatenate(([0], np.flatnonzero(np.diff(sorted_len)) + 1, [len(lengths)])).tolist()
        for a, b in zip(edges[:-1], edges[1:]):
            n, pos = int(sorted_len[a]), a
            while pos < b:
                left = b - pos
                k = bisect.bisect_left(free.spaces, n)
                if k < len(free.spaces):
                    space = free.spaces[k]
                    group = free.bins[space]
                    per_bin = min(space // n, left)
                    take = min(len(group), left // per_bin)
                    chosen = list(itertools.islice(reversed(group), take))  # the bin that got there last goes first
                    for c in chosen:
                        free.remove(space, c)
                else:
                    space, per_bin = capacity, min(capacity // n, left)
                    take = left // per_bin
                    chosen = list(range(n_bins, n_bins + take))
                    n_bins += take
                bin_of_sorted[pos : pos + take * per_bin] = np.repeat(chosen, per_bin)
                pos += take * per_bin
                free.add(space - per_bin * n, chosen)
        bin_of = np.empty_like(bin_of_sorted)
        bin_of[order] = bin_of_sorted
        return cls(lengths, capacity, bin_of, n_bins)

    def members(self, b: int) -> list[int]:
        if b not in self._members:
            self._members[b] = self._order[self._starts[b] : self._starts[b + 1]].tolist()
        return self._members[b]

    def _set_fill(self, b: int, fill: int) -> None:
        self.free.remove(self.capacity - self.fill[b], b)
        self.fill[b] = fill
        self.free.add(self.capacity - fill, [b])

    def move(self, item: int, src: int, dst: int) -> None:
        n = int(self.lengths[item])
        self.members(src).remove(item)
        self.members(dst).append(item)
        self._set_fill(src, self.fill[src] - n)
        self._set_fill(dst, self.fill[dst] + n)

    def dissolve(self, budget: int) -> None:
        """Move the examples of the least-filled bin into the others' free space, and repeat while a
        whole bin can be emptied that way.

        Best-fit decreasing leaves most bins a few tokens short (no example left was short enough
        for the gap) and a last, part-empty bin of the shortest examples. An example of that bin
        goes into the bin with the least room that still fits it; or into a roomy bin R after R has
        traded examples for shorter ones from bins with room for the difference, until its gap is
        large enough (`_make_room`). A bin that cannot be emptied is left as it was, and dissolving
        stops. `budget` caps the work (example visits), so very large datasets keep what is done by
        then (they lose little: the tail is a small part of them)."""
        total = int(self.lengths.sum())
        while self.n_alive > 1 and self.capacity * self.n_alive - total >= self.capacity and budget > 0:
            roomiest = self.free.spaces[-1]
            t = max(self.free.bins[roomiest])
            journal: list[tuple] = []
            for item in sorted(self.members(t), key=lambda i: (-self.lengths[i], i)):
                n = int(self.lengths[item])
                budget -= 1
                target = self.free.tightest(n, exclude=t)
                if target is None:
                    target, budget = self._make_room(t, n, budget, journal)
                if target is None:
                    break
                self.move(item, t, target)
                journal.append(("move", item, t, target))
            if self.members(t):  # could not empty it: undo, and keep the packing as it is
                for op in reversed(journal):
                    if op[0] == "move":
                        self.move(op[1], op[3], op[2])
                    else:
                        self._trade(op[1], op[4], op[3], op[2])
                break
            self.free.remove(self.capacity, t)
            self.alive[t] = False
            self.n_alive -= 1

    def _make_room(self, t: int, n: int, budget: int, journal: list, tries: int = 32) -> tuple[int | None, int]:
        """Grow the free space of a bin R (not t) to n tokens by trading its examples for shorter
        ones from bins S that have room for the difference (each trade moves free space from S to R:
        the smallest trade that is enough, else the largest). The `tries` roomiest bins are tried
        as R in turn; a failed try is undone. Returns R, or None, and the budget left."""
        candidates = []
        for space in reversed(self.free.spaces):  # the roomiest first, the lowest id first among equals
            candidates += sorted(b for b in self.free.bins[space] if b != t)
            if len(candidates) >= tries:
                break
        where = _Where(self)
        for r_bin in candidates[:tries]:
            trades = []
            while (need := n - (self.capacity - self.fill[r_bin])) > 0 and budget > 0:
                best, budget = where.best_trade(r_bin, t, need, budget)
                if best is None:
                    break
                trades.append(best)
                where.trade(r_bin, *best[1:])
            if n <= self.capacity - self.fill[r_bin]:
                journal += [("trade", r_bin, r, s_bin, s) for _, r, s_bin, s in trades]
                return r_bin, budget
            for _, r, s_bin, s in reversed(trades):  # undo: trade back
                where.trade(r_bin, s, s_bin, r)
            if budget <= 0:
                break
        return None, budget

    def _trade(self, r_bin: int, r: int, s_bin: int, s: int) -> None:
        """Example r leaves bin r_bin for s_bin, s the other way."""
        delta = int(self.lengths[r] - self.lengths[s])
        self.members(r_bin).remove(r), self.members(s_bin).remove(s)
        self.members(r_bin).append(s), self.members(s_bin).append(r)
        self._set_fill(r_bin, self.fill[r_bin] - delta)
        self._set_fill(s_bin, self.fill[s_bin] + delta)

    def as_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_starts, members) of the bins left, members in data order within a row."""
        if self._members:
            self.bin_of = self.bin_of.copy()
            for b, items in self._members.items():
                self.bin_of[items] = b
        renumber = np.cumsum(self.alive) - 1
        row_of = renumber[self.bin_of]
        members = np.argsort(row_of, kind="stable")  # grouped by row, data order inside a row
        sizes = np.bincount(row_of, minlength=self.n_alive)
        return np.concatenate(([0], np.cumsum(sizes))).astype(np.int64), members.astype(np.int64)


class _Where:
    """Every example's bin and position in its bin's member list, as arrays, for `_Bins._make_room`
    to find the best trade over all bins at once (numpy) instead of pair by pair. Kept in step
    with the trades it makes."""

    CHUNK = 1 << 18  # examples per block of the search (|R| x CHUNK deltas at a time)

    def __init__(self, bins: _Bins):
        self.bins = bins
        self.bin = bins.bin_of.copy()
        self.pos = np.empty(len(self.bin), np.int64)
        self.pos[bins._order] = np.arange(len(self.bin)) - bins._starts[self.bin[bins._order]]
        for b, items in bins._members.items():
            self._place(b, items)

    def _place(self, b: int, items: list[int]) -> None:
        self.bin[items] = b
        self.pos[items] = np.arange(len(items))

    def trade(self, r_bin: int, r: int, s_bin: int, s: int) -> None:
        self.bins._trade(r_bin, r, s_bin, s)
        self._place(r_bin, self.bins.members(r_bin))
        self._place(s_bin, self.bins.members(s_bin))

    def best_trade(self, r_bin: int, t: int, need: int, budget: int) -> tuple[tuple | None, int]:
        """The trade `_make_room` takes, as the pair-by-pair search over bins S with room (in bin
        order; R's members, then S's, in list order) finds it: 0 < delta <= S's room; the smallest
        delta that is enough, else the largest; the first found among equals. Returns
        ((delta, r, s_bin, s) or None, the budget left: |R| x |S| for every bin S searched)."""
        bins = self.bins
        members = bins.members(r_bin)
        r_len = bins.lengths[members][:, None]
        gap = bins.capacity - np.asarray(bins.fill, dtype=np.int64)
        room = gap[self.bin]
        searched = (room > 0) & (self.bin != r_bin) & (self.bin != t)
        items = np.flatnonzero(searched)
        budget -= len(members) * len(items)
        best = None  # (enough, |delta| order, s_bin, r position, s position, delta, r, s)
        for a in range(0, len(items), self.CHUNK):
            s_items = items[a : a + self.CHUNK]
            delta = r_len - bins.lengths[s_items][None, :]
            ri, si = np.nonzero((delta > 0) & (delta <= room[s_items][None, :]))
            if not len(ri):
                continue
            d = delta[ri, si]
            enough = d < need  # False (0) sorts first: a trade that is enough
            size = np.where(enough, -d, d)  # the smallest that is enough, else the largest
            s_of = s_items[si]
            j = np.lexsort((self.pos[s_of], ri, self.bin[s_of], size, enough))[0]
            found = (bool(enough[j]), int(size[j]), int(self.bin[s_of[j]]), int(ri[j]), int(self.pos[s_of[j]]),
                     int(d[j]), members[ri[j]], int(s_of[j]))  # fmt: skip
            best = found if best is None or found[:5] < best[:5] else best
        return (None if best is None else (best[5], best[6], best[2], best[7])), budget


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def make_rows(examples: list[Example], max_length: int, packing: bool) -> list[Row]:
    """One row per example, or packed rows of several examples with restarting positions."""
    if not packing:
        return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]
    starts, members = pack_lengths([len(e.input_ids) for e in examples], max_length)
    rows = []
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        row = Row([], [], [])
        for i in members[a:b].tolist():
            e = examples[i]
            row.input_ids += e.input_ids
            row.labels += e.labels
            row.position_ids += range(len(e.input_ids))
        rows.append(row)
    return rows
