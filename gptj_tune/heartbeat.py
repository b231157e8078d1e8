"""A file's modification time as a sign of life: a daemon thread touches it every `period` seconds
until stopped. The run lock, the data cache's build lock and each worker of a launch keep one;
whoever finds the file untouched for long enough takes its holder to be gone (or stopped)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path


class Heartbeat:
    def __init__(self, path: Path, period: float, name: str = "gptj-tune heartbeat", create: bool = False):
        """`create`: make the file on the first beat; else a file removed (a lock released) ends the beat."""
        self.path, self.period, self.create = Path(path), period, create
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, wait: bool = False) -> None:
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.path.touch(exist_ok=True) if self.create else os.utime(self.path)
            except FileNotFoundError:
                return
            except OSError:
                pass
            if self._stop.wait(self.period):
                return


def quiet_for(path: Path) -> float | None:
    """Seconds since `path` was last touched; None if it is not there."""
    try:
        return time.time() - Path(path).stat().st_mtime
    except OSError:
        return None


def read_holder(path: Path) -> dict:
    """What a lock file says of its holder (JSON: host, pid, ...); {} when it is gone or unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


FILE_GONE = "its file gone"  # holder_gone's reason when the lock was released (not left behind)
WRITE_GRACE = 10.0  # seconds a holder may take to write its JSON into the lock file it created


def holder_gone(path: Path, holder: dict, stale_after: float) -> str | None:
    """Why the holder of the lock file `path` (its JSON: host, pid) is taken to be gone, or None
    while it may still run: its file removed (FILE_GONE), its process ended (same host: known at
    once), the file still empty WRITE_GRACE seconds after its creation (its holder was stopped
    between creating and writing it), or the file untouched for `stale_after` seconds (a holder on
    another machine)."""
    quiet = quiet_for(path)
    if quiet is None:
        return FILE_GONE
    if not holder and quiet > WRITE_GRACE:
        return "left empty by a process stopped as it took the lock"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return "whose process has ended"
        except PermissionError:
            pass  # alive, another user's
        return None
    if quiet > stale_after:
        return f"untouched for {quiet:.0f} s"
    return None
