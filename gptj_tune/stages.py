"""Long work in named stages: a spinner while each one runs, then a line with what it did and how
long it took. Exporting or loading GPT-J-6B takes minutes (reading 12-24 GB, merging, writing,
reloading to verify), which used to pass in silence."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import ContextManager

Stage = Callable[[str], ContextManager[None]]


@contextlib.contextmanager
def no_display(what: str) -> Iterator[None]:
    yield


def stage_display(console) -> Stage:
    """`with stage("loading ..."):` shows a spinner on `console`, then `loading ...: 12.3 s`; a
    stage that raises prints nothing (its error says what happened)."""

    @contextlib.contextmanager
    def stage(what: str) -> Iterator[None]:
        started = time.perf_counter()
        with console.status(f"{what} ..."):
            yield
        console.print(f"{what}: {time.perf_counter() - started:.1f} s", markup=False, highlight=False, soft_wrap=True)

    return stage
