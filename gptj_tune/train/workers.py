"""The worker's side of a multi-process job started by `gptj-tune run` (train/launch.py): it leaves
its pid where the launching process forwards signals, a heartbeat, and its one-line error; it stops
when the command that started it is gone; and it names the rank a collective waited for in vain.

Everything goes through one folder of this machine, named by GPTJ_TUNE_ERROR_DIR.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import first_line
from ..heartbeat import Heartbeat, quiet_for

ERROR_DIR_ENV = "GPTJ_TUNE_ERROR_DIR"
COMMAND_PID_ENV = "GPTJ_TUNE_COMMAND_PID"  # the `gptj-tune run` process that started the launcher
TIMEOUT_ENV = "GPTJ_TUNE_TIMEOUT_MINUTES"  # distributed.timeout_minutes, for the message
HEARTBEAT_S = 2.0
STALE_S = 10.0  # a rank whose heartbeat is this old has stopped running (SIGSTOP, a frozen machine)
# What gloo and NCCL say when a peer process is gone.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "remote process exited", "ProcessGroupNCCL is aborted")  # fmt: skip
TIMED_OUT = ("Timed out", "timed out", "Timeout", "timeout")


def in_worker() -> bool:
    """True inside a process started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _folder() -> Path | None:
    folder = os.environ.get(ERROR_DIR_ENV)
    return Path(folder) if folder and in_worker() else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def register_worker() -> None:
    """Called by each worker at start: its pid (for the signals the launching process forwards), a
    heartbeat thread, and a watchdog that stops this worker (a checkpoint, then exit, as on Ctrl-C)
    when the `gptj-tune run` that started it has ended without stopping it: killed with SIGKILL, or
    its terminal closed."""
    folder = _folder()
    if folder is None:
        return
    rank = _rank()
    _write(folder / f"pid-{rank}", str(os.getpid()))
    Heartbeat(folder / f"alive-{rank}", HEARTBEAT_S, "gptj-tune worker heartbeat", create=True).start()
    command = os.environ.get(COMMAND_PID_ENV)
    if command:
        threading.Thread(target=_watch, args=(command,), daemon=True, name="gptj-tune-watchdog").start()


def command_id(pid: int) -> str:
    """`pid:start time`: names one process, not a later one given the same pid."""
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if fields else ""


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, start time at 19); None
    where there is no such process, or no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def is_running(command: str) -> bool:
    """Whether the process `pid:start time` (or a bare `pid`) runs: not ended, not a zombie, not a
    later process given the same pid."""
    pid_text, _, started = command.partition(":")
    if Path("/proc/self/stat").exists():  # Linux: a zombie, or a new process with the same pid, is gone too
        fields = _proc_stat(pid_text)
        return fields is not None and fields[0] != "Z" and (not started or fields[19] == started)
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch(command: str) -> None:
    while is_running(command):
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # stop as on Ctrl-C: a checkpoint after this step, then exit


def stalled_ranks() -> list[int]:
    """Ranks of this machine whose heartbeat stopped (the process is stopped or frozen), other than this one."""
    folder, rank = _folder(), _rank()
    if folder is None:
        return []
    found = []
    for beat in folder.glob("alive-*"):
        other, quiet = int(beat.name.removeprefix("alive-")), quiet_for(beat)
        if other != rank and quiet is not None and quiet > STALE_S:
            found.append(other)
    return sorted(found)


def _kill(ranks: list[int]) -> None:
    folder = _folder()
    for rank in ranks:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((folder / f"pid-{rank}").read_text()), signal.SIGKILL)


def describe_failure(e: BaseException) -> tuple[str, bool] | None:
    """A one-line message for a collective that failed because of another rank, and whether a peer
    was lost (the launching process then names the rank that died first); None for other errors.
    After a timeout, ranks of this machine that stopped running are killed, so the job ends now."""
    if not in_worker():
        return None
    text = first_line(e)
    if lost := next((word for word in PEER_LOST if word in text), None):
        return f"lost the connection to another rank, which ended first ({type(e).__name__}: {lost})", True
    if any(word in text for word in TIMED_OUT) and ("gloo" in text.lower() or "nccl" in text.lower()
                                                    or type(e).__name__ == "DistBackendError" or "collective" in text.lower()):  # fmt: skip
        stalled = stalled_ranks()
        _kill(stalled)  # stopped processes ignore the launcher's SIGTERM: it would wait 30 s more for them
        minutes = os.environ.get(TIMEOUT_ENV)
        waited = f"{float(minutes):g} min (distributed.timeout_minutes)" if minutes else "distributed.timeout_minutes"
        who = (f"rank {', '.join(map(str, stalled))} stopped running (no heartbeat for over {STALE_S:.0f} s: stopped or "
               f"frozen)" if stalled else "another rank did not join it (stuck, or on another machine)")  # fmt: skip
        return f"a collective waited {waited} in vain: {who}; the job was ended", False
    return None


def report_worker_error(message: str, exit_code: int, peer_lost: bool = False) -> None:
    """Called by a failing worker: leave its message where the launcher looks for it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    rank = _rank()
    record = {"rank": rank, "message": message, "exit_code": exit_code, "time": time.time(), "peer_lost": peer_lost}
    _write(Path(folder) / f"rank-{rank}.json", json.dumps(record))


_KEPT: list = []  # what keep_until_exit holds


def keep_until_exit(*objects) -> None:
    """Hold `objects` until this worker leaves (leave_worker, which does not finalize them). After
    accelerate's end_training has destroyed the process group, a DDP model's reducer holds its last
    reference, and freeing the model joins gloo's threads: seen in CI, rank 1 hung for good in
    ~ProcessGroupGloo as train() returned, after rank 0 had finished and exited (the join waited on a
    thread that waited on the gone peer). Outside a worker this does nothing."""
    if in_worker():
        _KEPT.extend(objects)


def leave_worker(code: int) -> None:
    """End a worker process without the interpreter's teardown. DeepSpeed keeps a process group in a
    module global after the group is destroyed (deepspeed.utils.groups._WORLD_GROUP); it is then
    freed while the interpreter is being torn down, and gloo's C++ side sometimes aborts there
    ("terminate called without an active exception", SIGABRT: seen in CI after a finished ZeRO-2 run,
    whose launcher then reported a failure). atexit handlers still run and output is flushed; only
    the finalization of leftover objects is skipped. It first leaves `done-RANK` (the exit code) for
    the launching process, which ends a worker still running a while after rank 0 finished
    (`launch.end_stuck_workers`)."""
    folder = _folder()
    if folder is not None:  # this rank's work is over: the launching process watches for what follows
        with contextlib.suppress(OSError):
            _write(folder / f"done-{_rank()}", str(code))
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
