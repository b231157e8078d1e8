"""Long work in named stages: a spinner while each one runs, then a line with what it did and how
long it took. Exporting or loading GPT-J-6B takes minutes (reading 12-24 GB, merging, writing,
reloading to verify), which used to pass in silence. Warnings printed on the way look alike: `warner`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import ContextManager

Stage = Callable[[str], ContextManager[None]]


@contextlib.contextmanager
def no_display(what: str) -> Iterator[None]:
    yield


def stage_display(console, quiet_below: float = 0.0) -> Stage:
    """`with stage("loaded ..."):` shows a spinner on `console`, then `loaded ...: 12.3 s` (unless
    it took under `quiet_below` seconds: the tiny model's load is no news); a stage that raises
    prints nothing (its error says what happened)."""

    @contextlib.contextmanager
    def stage(what: str) -> Iterator[None]:
        started = time.perf_counter()
        with console.status(f"{what} ..."):
            yield
        took = time.perf_counter() - started
        if took >= quiet_below:
            console.print(f"{what}: {took:.1f} s", markup=False, highlight=False, soft_wrap=True)

    return stage


def warner(console) -> Callable[[str], None]:
    """A function that prints `warning: TEXT` on `console` (TEXT as written, not read as markup)."""
    from rich.markup import escape

    return lambda text: console.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)
