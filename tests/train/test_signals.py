"""StopRequest (train/signals.py) on its own: the first signal asks for a stop, the copy a launcher
passes on within the window is ignored, a later one aborts, and the handlers are given back."""

from __future__ import annotations

import os
import signal

import pytest

from gptj_tune.train.signals import StopRequest


def test_the_first_signal_asks_once_a_passed_on_copy_is_ignored_and_a_later_one_aborts():
    clock, asked = [100.0], []
    with StopRequest(on_request=lambda: asked.append(1), clock=lambda: clock[0]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, in the main thread
        assert stop.requested and asked == [1]
        clock[0] += 0.01  # srun / torchrun hand the same signal on: not an abort
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked == [1]
        clock[0] += 5.0  # the user presses Ctrl-C again: abort without saving
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_agreed_through_another_process_is_not_asked_again():
    clock, asked = [0.0], []
    with StopRequest(on_request=lambda: asked.append(1), clock=lambda: clock[0]) as stop:
        stop.agreed = True  # another process was signalled: every process stops after this step
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested and asked == []
        clock[0] += 10.0
        with pytest.raises(KeyboardInterrupt):  # but a second signal still aborts
            os.kill(os.getpid(), signal.SIGINT)


def test_leaving_gives_the_previous_handlers_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handle
    assert {s: signal.getsignal(s) for s in before} == before
