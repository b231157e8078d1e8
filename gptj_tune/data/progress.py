"""The progress shown while a token store is built: records read, tokens written, tokens/s."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .build import Progress as ProgressCallback

PLAIN_EVERY = 30.0  # seconds between the plain lines written where the output is not a terminal


@contextmanager
def data_progress(console: Console, plain_every: float = PLAIN_EVERY) -> Iterator[ProgressCallback]:
    """A callback for `prepare_data(progress=...)`, and a summary line when the block ends. On a
    terminal a live line appears on the first call (a cache hit shows nothing); elsewhere (a log
    file, CI) a plain line every `plain_every` seconds, as the training bar prints every
    `train.log_every` steps, and no blank line where a live display would have been."""
    live = console.is_terminal
    display = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    state = {"task": None, "start": 0.0, "shown": 0.0, "records": 0, "tokens": 0}

    def update(records: int, tokens: int) -> None:
        now = time.perf_counter()
        if state["task"] is None:
            state["start"] = state["shown"] = now
            if live:
                display.start()
            state["task"] = display.add_task("preparing data")
        rate = tokens / max(1e-9, now - state["start"])
        state["records"], state["tokens"] = records, tokens
        text = f"preparing data: {records:,} records, {tokens:,} tokens ({rate:,.0f} tokens/s)"
        if live:
            display.update(state["task"], description=text)
        elif now - state["shown"] >= plain_every:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
            state["shown"] = now

    try:
        yield update
    finally:
        if state["task"] is not None:
            if live:
                display.stop()
            took = time.perf_counter() - state["start"]
            console.print(f"data: tokenized {state['records']:,} records into {state['tokens']:,} tokens in {took:.1f} s")
