"""One writer per run directory: `gptj-tune run` holds a lock beside it while it trains.

The lock is a file next to the run directory (`.NAME.lock` in its parent, so `--force` deleting
the directory keeps it), created with O_EXCL and holding who took it: host, pid, start time and a
random token. Nothing relies on fcntl, which NFS does not honour across machines. While the run
lasts a thread touches the file every HEARTBEAT seconds, so a lock is recognised as left behind
when its process is gone (same host), or when nobody has touched it for STALE_AFTER seconds (a
holder on another machine); such a lock is taken over with a note. Two runs on one directory, or
`--resume` while a run still trains, are refused naming the holder.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from .errors import RunDirError
from .heartbeat import Heartbeat, holder_gone, read_holder

HEARTBEAT = 30.0
STALE_AFTER = 300.0


class RunLock:
    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir).resolve()
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.run_dir = run_dir
        self.token = secrets.token_hex(8)
        self._beat: Heartbeat | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunDirError naming who holds it. Returns a note when a lock left
        by a run that is gone was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token}
        note = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            why = holder_gone(self.path, holder, STALE_AFTER)
            if why is None:
                raise RunDirError(self._in_use(holder)) from None
            tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
            tmp.write_text(json.dumps(me))
            os.replace(tmp, self.path)
            time.sleep(0.05)  # two takers at once: the last rename wins, the other sees it below
            if self._holder().get("token") != self.token:
                raise RunDirError(self._in_use(self._holder())) from None
            note = f"took over the lock {self.path} left by {_who(holder)}, {why}"
        else:
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
            except BaseException:  # a stop signal (or a full disk) between creating the lock and writing it
                self.path.unlink(missing_ok=True)
                raise
        self._beat = Heartbeat(self.path, HEARTBEAT, "gptj-tune run lock").start()
        return note

    def release(self) -> None:
        if self._beat is not None:
            self._beat.stop()
        if self._holder().get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def held(self) -> bool:
        """Whether a run that may still be alive holds the lock (what `gptj-tune runs` reports as running)."""
        return self.path.exists() and holder_gone(self.path, self._holder(), STALE_AFTER) is None

    def _holder(self) -> dict:
        return read_holder(self.path)

    def _in_use(self, holder: dict) -> str:
        return (f"{self.run_dir} is in use by another gptj-tune run ({_who(holder)}): wait for it to end or stop it, or "
                f"--set output.dir=runs/NEW. If that run is gone (another machine; its lock is taken over after "
                f"{STALE_AFTER:.0f} s untouched), delete {self.path}")  # fmt: skip


def lock_for_this_process(recipe) -> RunLock | None:
    """The run directory's lock for this `gptj-tune run` to hold: the command a user started (it
    holds it for its workers too; on several machines, the first machine's), or rank 0 under a
    launcher that is not ours; None in our workers."""
    from .train.workers import ERROR_DIR_ENV, in_worker

    if in_worker() and (os.environ.get(ERROR_DIR_ENV) or os.environ.get("RANK", "0") != "0"):
        return None
    if recipe.distributed.machine_rank != 0:  # the machines share the directory: machine 0 holds it
        return None
    return RunLock(recipe.output.dir)


def _who(holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}"
