"""Rows to batches: collated and padded tensors, served by a global index in a seeded per-epoch
order, so a resumed run reads exactly the batches an uninterrupted one would.

Padding is its own segment of restarting positions, so it is masked by position, never by token
id (GPT-J pads with EOS, which must be learned).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .pack import Row
from .tokens import IGNORE


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
