"""`gptj-tune data prepare` (build a recipe's token store ahead of a run and print what is in it)
and `gptj-tune data show` (packed rows decoded, targets highlighted, example boundaries marked)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .data import PreparedData, prepare_data
from .data.progress import data_progress
from .model.load import tokenizer_as_trained
from .recipe import Recipe


def recipe_data(recipe: Recipe, console: Console) -> tuple[PreparedData, object, float]:
    """The recipe's prepared data (from the cache, or built now with progress), its tokenizer and
    the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="gptj-tune-data-") as scratch:
        tokenizer = tokenizer_as_trained(recipe.model, Path(scratch))
    start = time.perf_counter()
    with data_progress(console) as progress:
        data = prepare_data(recipe.data, tokenizer, recipe.prompt_slots(), progress, console.print)
    return data, tokenizer, time.perf_counter() - start


def print_prepared(data: PreparedData, recipe: Recipe, seconds: float, console: Console, plot: Path | None) -> Path | None:
    """The statistics of a prepared store; the length histogram written to `plot` (default: in
    the store's folder). Returns the PNG's path, or None without matplotlib."""
    meta = data.store.meta
    how = "built now" if data.built else "already prepared (cache hit)"
    console.print(f"store: {escape(str(data.store.folder))} ({how}, {seconds:.1f} s; tokenizer via {meta['encoder']})")
    dedup = recipe.data.deduplicate
    sources = Table("source", "format", "records", "skipped", *(["duplicates"] if dedup else []), "examples", "train", "held out",
                    title="sources")  # fmt: skip
    for i, s in enumerate(meta["sources"]):
        sources.add_row(f"{i}: {escape(str(s['path'] or 'synthetic'))}", s["format"], f"{s['records']:,}", f"{s['skipped']:,}",
                        *([f"{s.get('duplicates', 0):,}"] if dedup else []), f"{s['examples']:,}", f"{s['train_examples']:,}",
                        f"{s['held_out_examples']:,}")  # fmt: skip
    console.print(sources)
    splits = Table("split", "examples", "tokens", "target tokens", "truncated", "dropped", "rows", "padding efficiency")
    for name, stats, rows in (("train", data.train_stats, data.train_rows), ("held out", data.eval_stats, data.eval_rows)):
        lengths = data.row_lengths("train" if name == "train" else "eval")
        eff = lengths.sum() / max(1, len(lengths) * recipe.data.max_length)
        splits.add_row(name, f"{stats.examples:,}", f"{stats.tokens:,}", f"{stats.target_tokens:,}", f"{stats.truncated:,}",
                       f"{stats.dropped:,}", f"{len(rows):,}", f"{eff:.3f}")  # fmt: skip
    console.print(splits)
    console.print(f"[dim]rows are {recipe.data.max_length} tokens wide{' (packed)' if recipe.data.packing else ''}; "
                  f"train rows count each weighted repeat; padding efficiency = real tokens / (rows x max_length)[/]")  # fmt: skip
    if meta["skipped_records"]:
        console.print(f"[yellow]{meta['skipped_records']:,} malformed records skipped[/] (data.on_bad_record: skip), e.g.:")
        for message in meta["skipped_messages"][:5]:
            console.print(f"  {escape(message)}", soft_wrap=True)
    return _length_plot(data, recipe.data.max_length, plot or data.store.folder / "lengths.png")


def _length_plot(data: PreparedData, max_length: int, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .rundir import atomic_write

    examples = np.unique(np.asarray(data.train_rows.members)) if hasattr(data.train_rows, "members") else np.zeros(0, int)
    lengths = data.store.example_lengths()[examples] - data.store.meta["prompt_slots"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(60, max(1, len(np.unique(lengths)))), color="#4c72b0")
    ax.axvline(max_length - data.store.meta["prompt_slots"], color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per training example")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(lengths):,} training examples, median {int(np.median(lengths)) if len(lengths) else 0} tokens")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def show_rows(data: PreparedData, tokenizer, split: str, first: int, n: int, console: Console) -> None:
    """Rows `first`..`first + n - 1` of a split, decoded: each example under a rule naming it,
    target tokens bold green, the rest dim; a soft prompt's slots named, not decoded."""
    rows = data.train_rows if split == "train" else data.eval_rows
    slots = data.store.meta["prompt_slots"]
    console.print(f"[dim]{len(rows):,} {split} rows; legend:[/] [dim]not trained on (prompt)[/] [bold green]target[/]")
    for r in range(first, min(first + n, len(rows))):
        row = rows[r]
        positions = np.asarray(row.position_ids)
        starts = np.flatnonzero(positions == 0).tolist() + [len(positions)]
        console.rule(f"row {r}: {len(positions)} tokens, {len(starts) - 1} example(s)")
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            ids, labels = np.asarray(row.input_ids[a:b]), np.asarray(row.labels[a:b])
            targets = int((labels != -100).sum())
            console.print(f"[cyan]── example {k + 1}: {b - a} tokens, {targets} targets ──[/]")
            console.print(_highlighted(tokenizer, ids[slots:], labels[slots:] != -100, slots), soft_wrap=True)


def _highlighted(tokenizer, ids: np.ndarray, target: np.ndarray, slots: int) -> Text:
    text = Text()
    if slots:
        text.append(f"[soft prompt: {slots} positions]", style="magenta")
    edges = np.flatnonzero(np.diff(target.astype(np.int8))) + 1
    for a, b in zip([0, *edges.tolist()], [*edges.tolist(), len(ids)]):
        if a == b:
            continue
        piece = tokenizer.decode(ids[a:b].tolist())
        text.append(piece, style="bold green" if target[a] else "dim")
    return text
