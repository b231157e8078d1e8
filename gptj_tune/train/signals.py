"""Ctrl-C, SIGTERM and SIGHUP. Outside the training loop they stop the command at once (exit 130); inside
it the first asks for a checkpoint and a stop after the current step, and a second one, seconds
later, aborts at once."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable

from ..errors import Stopped

# Ctrl-C, SIGTERM, and SIGHUP (the terminal was closed).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopRequest:
    """While entered, SIGINT and SIGTERM are caught here instead of ending the process.

    The first signal sets `requested` (and calls `on_request`, once); the loop then saves a
    checkpoint after the step and stops. A launcher that passes a signal on (torchrun, SLURM's
    srun) delivers it twice within milliseconds, so a repeat within `repeat_window_s` is that same
    signal; a signal after it is the user's "abort now" and raises KeyboardInterrupt. On leaving,
    the handlers in place before are restored. `agreed` is set by the loop once every process has
    agreed to stop (another process was signalled): a signal of this one's then only counts as
    the first of a possible abort.
    """

    def __init__(self, on_request: Callable[[], None] = lambda: None, repeat_window_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.requested = False
        self.agreed = False
        self._on_request, self._window, self._clock = on_request, repeat_window_s, clock
        self._first_at: float | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def handle(self, signum, frame) -> None:
        now = self._clock()
        if self._first_at is not None:
            if now - self._first_at > self._window:
                raise KeyboardInterrupt
            return
        self._first_at = now
        if self.requested or self.agreed:
            return
        self.requested = True
        self._on_request()


@contextlib.contextmanager
def signals_stop_the_command(passthrough: tuple[type[BaseException], ...] = (), where: str = " outside the training loop",
                             after: str = "files are written whole or not at all, and a run with a checkpoint "
                                          "continues with --resume"):  # fmt: skip
    """Ctrl-C or SIGTERM outside the training loop (imports, loading, data preparation, the final
    save) stops the command at once, as `Stopped` (exit 130). A signal can land inside an import,
    which some libraries then report as another error (seen: a worker stopped while importing said
    `ModuleNotFoundError: No module named 'version'`), so after a signal whatever ends the command
    is reported as the stop, except `Stopped` itself and the `passthrough` exceptions (the CLI's
    exit). The training loop installs its own handlers (`StopRequest`) and gives these back."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        if not received or isinstance(e, (Stopped, *passthrough)):  # (our own errors too: ModelError wraps ImportError)
            raise
        raise Stopped(
            f"stopped by {signal.Signals(received[0]).name}{where}; {after}"
        ) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
