"""A file's modification time as a sign of life: a daemon thread touches it every `period` seconds
until stopped. The run lock, the data cache's build lock and each worker of a launch keep one;
whoever finds the file untouched for long enough takes its holder to be gone (or stopped)."""

from __future__ import annotations

import os
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
