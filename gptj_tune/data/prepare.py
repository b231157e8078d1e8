"""A recipe's data made ready: the token store for its data section, from the shared cache or
built into it (data/build.py), opened as train and held-out rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..recipe import DataSection
from .build import Progress, build_store
from .build import split_indices as split_indices
from .cache import cache_dir_of, cache_key, open_or_build
from .pack import Row
from .store import Rows, TokenStore
from .templates import Template
from .tokens import TokenizeStats


@dataclass
class PreparedData:
    train_rows: Rows | list[Row]
    eval_rows: Rows | list[Row]
    eval_records: list[dict]  # held-out instruction records, for generation checks
    template: Template
    train_stats: TokenizeStats = field(default_factory=TokenizeStats)
    eval_stats: TokenizeStats = field(default_factory=TokenizeStats)
    skipped_records: int = 0
    duplicates: int = 0  # records left out as copies of earlier ones (data.deduplicate)
    store: TokenStore | None = None
    built: bool = False  # whether this call tokenized (False: the cache had it)

    @classmethod
    def open(cls, folder: Path, built: bool = False) -> PreparedData:
        store = TokenStore(folder)
        meta = store.meta
        return cls(
            train_rows=store.rows("train"),
            eval_rows=store.rows("eval"),
            eval_records=meta["eval_records"],
            template=Template(**{**meta["template"], "stop": tuple(meta["template"]["stop"])}),
            train_stats=TokenizeStats(**meta["train_stats"]),
            eval_stats=TokenizeStats(**meta["eval_stats"]),
            skipped_records=meta["skipped_records"],
            duplicates=sum(source.get("duplicates", 0) for source in meta["sources"]),
            store=store,
            built=built,
        )

    def row_lengths(self, split: str = "train") -> np.ndarray:
        rows = self.train_rows if split == "train" else self.eval_rows
        if isinstance(rows, Rows):
            return rows.lengths()
        return np.asarray([len(r.input_ids) for r in rows], np.int64)

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / token slots in full-width rows (what packing buys)."""
        lengths = self.row_lengths()
        if len(lengths) == 0:
            return 0.0
        return float(lengths.sum() / (lengths.max() * len(lengths)))


def prepare_data(section: DataSection, tokenizer, prompt_slots: int = 0, progress: Progress | None = None,
                 waiting: Callable[[str], None] | None = None) -> PreparedData:  # fmt: skip
    """The store for `section` (read, split, tokenized, weighted and packed), from the cache when
    an earlier run or `gptj-tune data prepare` built it, else built now.

    `prompt_slots`: positions a soft prompt takes at the start of every example (prompt tuning);
    examples get that much less of max_length, so rows stay max_length wide. `progress` is called
    with (records, tokens) while building; `waiting` with a message when another process builds."""
    key = cache_key(section, tokenizer, prompt_slots)
    entry, built = open_or_build(cache_dir_of(section), key,
                                 lambda folder: build_store(section, tokenizer, prompt_slots, folder, progress), waiting)  # fmt: skip
    return PreparedData.open(entry, built)
