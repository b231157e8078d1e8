"""A recipe's data made ready: every source read, split into train and held out, tokenized, weighted
and packed into rows."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

from ..recipe import DataSection
from .formats import read_source
from .pack import Row, make_rows
from .templates import Template, get_template
from .tokens import IGNORE, Example, TokenizeStats, tokenize_instructions, tokenize_text


@dataclass
class PreparedData:
    train_rows: list[Row]
    eval_rows: list[Row]
    eval_records: list[dict]  # held-out instruction records, for generation checks
    template: Template
    train_stats: TokenizeStats = field(default_factory=TokenizeStats)
    eval_stats: TokenizeStats = field(default_factory=TokenizeStats)
    skipped_records: int = 0

    def to_json(self) -> str:
        """Everything as JSON: the multi-process run's shared cache holds this, not a pickle, so
        nothing in a run directory runs code when it is read (`from_json`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PreparedData:
        raw = json.loads(text)
        return cls(
            train_rows=[Row(**r) for r in raw["train_rows"]],
            eval_rows=[Row(**r) for r in raw["eval_rows"]],
            eval_records=raw["eval_records"],
            template=Template(**{**raw["template"], "stop": tuple(raw["template"]["stop"])}),
            train_stats=TokenizeStats(**raw["train_stats"]),
            eval_stats=TokenizeStats(**raw["eval_stats"]),
            skipped_records=raw["skipped_records"],
        )

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / token slots in full-width rows (what packing buys)."""
        width = max((len(r.input_ids) for r in self.train_rows), default=1)
        return sum(len(r.input_ids) for r in self.train_rows) / max(1, width * len(self.train_rows))


def split_indices(n: int, fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of n items: the same (n, fraction, cap, seed) gives the same split."""
    n_eval = min(cap, int(round(n * fraction))) if n > 1 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def with_prompt_slots(examples: list[Example], n: int, slot_id: int) -> list[Example]:
    """Each example behind n slot tokens that are never targets; the model puts its soft prompt
    there (methods.SoftPromptModel), whatever the token id."""
    if n == 0:
        return examples
    return [Example([slot_id] * n + e.input_ids, [IGNORE] * n + e.labels) for e in examples]


def apply_weight(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """Repeat a source `floor(weight)` times plus a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(examples, int(round(len(examples) * frac)))
    return examples * whole + extra


def prepare_data(section: DataSection, tokenizer, prompt_slots: int = 0) -> PreparedData:
    """Every source read, split, tokenized and weighted, then packed (or padded) into rows.
    `prompt_slots`: positions a soft prompt takes at the start of every example (prompt tuning);
    examples get that much less of max_length, so rows stay max_length wide."""
    template = get_template(section.template)
    length = section.max_length - prompt_slots
    train_examples: list[Example] = []
    eval_examples: list[Example] = []
    eval_records: list[dict] = []
    train_stats, eval_stats, skipped = TokenizeStats(), TokenizeStats(), 0
    for index, source in enumerate(section.sources):
        read = read_source(source, index, section.on_bad_record)
        skipped += len(read.skipped)
        if source.format == "text":
            examples, stats = tokenize_text(read.records, tokenizer, length)
            train_idx, eval_idx = split_indices(len(examples), section.eval_fraction, section.eval_max, section.split_seed)
            train_part = [examples[i] for i in train_idx]
            eval_part = [examples[i] for i in eval_idx]
            train_stats.add(stats)
        else:
            train_idx, eval_idx = split_indices(len(read.records), section.eval_fraction, section.eval_max, section.split_seed)
            held = [read.records[i] for i in eval_idx]
            args = (tokenizer, template, length, section.train_on_prompt, section.overlong)
            train_part, stats = tokenize_instructions([read.records[i] for i in train_idx], *args)
            eval_part, held_stats = tokenize_instructions(held, *args)
            train_stats.add(stats)
            eval_stats.add(held_stats)
            eval_records += held
        train_examples += apply_weight(with_prompt_slots(train_part, prompt_slots, tokenizer.eos_token_id),
                                       source.weight, section.split_seed + index)  # fmt: skip
        eval_examples += with_prompt_slots(eval_part, prompt_slots, tokenizer.eos_token_id)
    return PreparedData(
        train_rows=make_rows(train_examples, section.max_length, section.packing),
        eval_rows=make_rows(eval_examples, section.max_length, section.packing),
        eval_records=eval_records,
        template=template,
        train_stats=train_stats,
        eval_stats=eval_stats,
        skipped_records=skipped,
    )
