"""The records of a source kept aside while it is tokenized: each chunk of records goes to the
store's writer and, as JSON lines, to a spill file, from which the held-out ones are read back
once the split is known (a corpus larger than memory is never held)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

spill_line = json.JSONEncoder(check_circular=False).encode  # a record is strings in a dict: no cycle to look for


def spilled_chunks(records, size: int, spill: Path, write: Callable[..., list[int]],
                   ahead: Callable[[list[dict]], object] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`write` (which tokenizes into the store and gives each record's example index, -1: dropped)
    called on `size` records at a time, each record also kept as a JSON line in `spill` for the
    held-out ones. With `ahead`, each chunk is handed to it as soon as it is read, one chunk before
    it is written, and `write(chunk, what ahead gave)`. Returns the example indices and the
    records' byte offsets in `spill`."""
    example_of: list[int] = []
    offsets: list[np.ndarray] = []
    written = 0
    waiting: list[tuple[list[dict], object]] = []  # read and handed ahead, not written yet
    with open(spill, "wb") as out:

        def flush(chunk: list[dict], *handed) -> None:
            nonlocal written, example_of
            lines = [spill_line(r) for r in chunk]  # ASCII (escaped JSON): a character is a byte
            sizes = np.fromiter(map(len, lines), np.int64, len(lines)) + 1
            offsets.append(written + np.cumsum(sizes) - sizes)
            out.write(("\n".join(lines) + "\n").encode("ascii"))
            written += int(sizes.sum())
            example_of += write(chunk, *handed)

        def read(chunk: list[dict]) -> None:
            if ahead is None:
                flush(chunk)
                return
            waiting.append((chunk, ahead(chunk)))
            if len(waiting) == 2:
                flush(*waiting.pop(0))

        chunk: list[dict] = []
        for record in records:
            chunk.append(record)
            if len(chunk) == size:
                read(chunk)
                chunk = []
        if chunk:
            read(chunk)
        while waiting:
            flush(*waiting.pop(0))
    return np.asarray(example_of, np.int64), np.concatenate(offsets) if offsets else np.zeros(0, np.int64)



def read_lines(spill: Path, offsets: np.ndarray, picks: list[int]) -> list[dict]:
    out = []
    with open(spill, "rb") as f:
        for i in picks:
            f.seek(int(offsets[i]))
            out.append(json.loads(f.readline()))
    return out
