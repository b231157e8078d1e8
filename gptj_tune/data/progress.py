"""The progress line shown while a token store is built: records read, tokens written, tokens/s."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .build import Progress as ProgressCallback


@contextmanager
def data_progress(console: Console) -> Iterator[ProgressCallback]:
    """A callback for `prepare_data(progress=...)`; the line appears on the first call (a cache hit
    shows nothing) and is replaced by a summary when the block ends."""
    display = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    state = {"task": None, "start": 0.0, "records": 0, "tokens": 0}

    def update(records: int, tokens: int) -> None:
        if state["task"] is None:
            display.start()
            state["task"] = display.add_task("preparing data")
            state["start"] = time.perf_counter()
        rate = tokens / max(1e-9, time.perf_counter() - state["start"])
        state["records"], state["tokens"] = records, tokens
        display.update(state["task"], description=f"preparing data: {records:,} records, {tokens:,} tokens ({rate:,.0f} tokens/s)")

    try:
        yield update
    finally:
        if state["task"] is not None:
            display.stop()
            took = time.perf_counter() - state["start"]
            console.print(f"data: tokenized {state['records']:,} records into {state['tokens']:,} tokens in {took:.1f} s")
