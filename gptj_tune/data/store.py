"""The token store: a prepared dataset as flat arrays in a folder, memory-mapped when read.

Why flat arrays and not Arrow: what training reads is a row of token ids, built from a few
contiguous slices; flat uint16 arrays (uint32 past 65,536 token ids) with int64 offsets are 2 bytes
a token on disk, map straight into numpy with no decoding, and need nothing but numpy. The files:

    tokens.bin     every example's token ids, one after another (uint16 or uint32)
    targets.bin    1 where that token is a target (takes a loss), else 0 (uint8)
    starts.npy     example i is tokens[starts[i]:starts[i + 1]] (int64, one more than examples)
    train.npy, train-starts.npy, eval.npy, eval-starts.npy
                   rows as example indices: row r of a split holds examples
                   split[starts[r]:starts[r + 1]] (a weighted source repeats indices, not tokens)
    meta.json      statistics, the template, held-out records, skipped-record messages, versions

A label is the token id where the token is a target and IGNORE elsewhere; positions restart at 0
for each example of a row (data/pack.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .pack import Row
from .tokens import IGNORE

FORMAT_VERSION = 1


class StoreWriter:
    """Examples appended to the store's files as they are tokenized: memory stays flat however
    large the corpus is (only per-example offsets and counts are kept, ~20 bytes an example)."""

    def __init__(self, folder: Path, vocab_size: int):
        self.folder = folder
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        self._tokens = open(folder / "tokens.bin", "wb")
        self._targets = open(folder / "targets.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self._target_counts: list[np.ndarray] = []
        self._truncated: list[np.ndarray] = []
        self.n_examples = 0

    def append(self, ids: np.ndarray, targets: np.ndarray, lengths: np.ndarray, truncated: np.ndarray | None = None) -> None:
        """Examples given as their tokens and target flags end to end, and their lengths."""
        if len(lengths) == 0:
            return
        np.asarray(ids, dtype=self.dtype).tofile(self._tokens)
        targets = np.asarray(targets, dtype=np.uint8)
        targets.tofile(self._targets)
        lengths = np.asarray(lengths, dtype=np.int64)
        self._lengths.append(lengths)
        ends = np.cumsum(lengths)
        cumulative = np.concatenate(([0], np.cumsum(targets, dtype=np.int64)))
        self._target_counts.append(cumulative[ends] - cumulative[ends - lengths])
        self._truncated.append(np.zeros(len(lengths), bool) if truncated is None else np.asarray(truncated, bool))
        self.n_examples += len(lengths)

    def lengths(self) -> np.ndarray:
        return _joined(self._lengths, np.int64)

    def target_counts(self) -> np.ndarray:
        return _joined(self._target_counts, np.int64)

    def truncated(self) -> np.ndarray:
        return _joined(self._truncated, bool)

    def finish(self, rows: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
        """Close the token files and write the example offsets, the rows of each split and meta."""
        self._tokens.close()
        self._targets.close()
        np.save(self.folder / "starts.npy", np.concatenate(([0], np.cumsum(self.lengths()))).astype(np.int64))
        for split, (row_starts, members) in rows.items():
            np.save(self.folder / f"{split}-starts.npy", row_starts.astype(np.int64))
            np.save(self.folder / f"{split}.npy", members.astype(np.int64))
        meta = {"format_version": FORMAT_VERSION, "dtype": np.dtype(self.dtype).name, **meta}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))

    def abandon(self) -> None:
        self._tokens.close()
        self._targets.close()


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    """The parts as one array, kept as the list's only part: asked again after more appends (once
    per source), only the new parts are joined to it."""
    if len(parts) > 1:
        parts[:] = [np.concatenate(parts)]
    return parts[0] if parts else np.zeros(0, dtype)


class TokenStore:
    """A finished store, memory-mapped: nothing is read until a row is."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r") if self._has_tokens() else np.zeros(0, np.uint16)
        self.targets = np.memmap(self.folder / "targets.bin", dtype=np.uint8, mode="r") if self._has_tokens() else np.zeros(0, np.uint8)
        self.starts = self._array("starts.npy", mmap_mode="r")

    def _has_tokens(self) -> bool:
        return (self.folder / "tokens.bin").stat().st_size > 0  # numpy cannot map an empty file

    def rows(self, split: str) -> Rows:
        return Rows(self, self._array(f"{split}-starts.npy"), self._array(f"{split}.npy", mmap_mode="r"))

    def _array(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        """An index array, read without pickle (numpy's allow_pickle=False): a file holding objects, or
        damaged, is an error naming it, never code that runs."""
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            what = "holds pickled Python objects, which gptj-tune does not load" if "allow_pickle" in str(e) else f"is damaged ({e})"
            raise DataError(f"{path} {what}: delete {self.folder} (the data cache) and it is prepared again") from None
        if array.dtype.kind not in "iu":
            raise DataError(f"{path} holds {array.dtype} values, not indices: delete {self.folder} (the data cache) and it is "
                            f"prepared again")  # fmt: skip
        return array

    def example_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.starts))


@dataclass
class Rows:
    """One split's rows: a sequence of `Row`s read from the store's mapping on demand."""

    store: TokenStore
    row_starts: np.ndarray
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, r: int) -> Row:
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        r %= len(self)
        examples = np.asarray(self.members[self.row_starts[r] : self.row_starts[r + 1]])
        starts, ends = self.store.starts[examples], self.store.starts[examples + 1]
        ids = np.concatenate([self.store.tokens[a:b] for a, b in zip(starts, ends)]).astype(np.int64)
        targets = np.concatenate([self.store.targets[a:b] for a, b in zip(starts, ends)]).astype(bool)
        positions = np.concatenate([np.arange(b - a) for a, b in zip(starts, ends)])
        return Row(ids, np.where(targets, ids, IGNORE), positions)

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Tokens in each row."""
        example_lengths = self.store.example_lengths()
        per_member = np.asarray(example_lengths[np.asarray(self.members)], dtype=np.int64)
        cumulative = np.concatenate(([0], np.cumsum(per_member)))
        return cumulative[self.row_starts[1:]] - cumulative[self.row_starts[:-1]]
