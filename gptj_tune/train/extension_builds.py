"""DeepSpeed's compiled extensions: before DeepSpeed starts, locks left by interrupted builds are
removed (DeepSpeed would wait on them forever) and a first build is announced."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from rich.markup import escape

def prepare_deepspeed_builds(console) -> None:
    """Before DeepSpeed starts on this machine (from the one process that launches it, so no worker
    of ours can be mid-build): free the compiled-extension builds of locks nobody holds, and say so
    when its CPU all-reduce op is about to be compiled for the first time.

    DeepSpeed compiles ops with torch's JIT extension builder, which serialises builds with a lock
    file and waits for it *forever*, silently. A build killed with its lock taken (SIGKILL, a
    timeout, a worker stopped while compiling) leaves that file behind, and every later DeepSpeed
    run on the machine hangs at start. The holder keeps the file open, so a lock no live process
    has open is a leftover and can go."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in stale_build_locks(root):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        console.print(
            f"[yellow]note:[/] removed a lock left by an interrupted extension build, which DeepSpeed "
            f"would have waited on forever: {escape(str(lock))}",
            soft_wrap=True,
        )
    if not torch.cuda.is_available() and sys.platform == "linux":
        python = f"py{sys.version_info.major}{sys.version_info.minor}"
        built = [*root.glob("deepspeed_shm_comm/*.so"), *root.glob(f"{python}*/deepspeed_shm_comm/*.so")]
        if not built:
            console.print(
                "[dim]DeepSpeed compiles its CPU all-reduce op on first use on this machine "
                "(a minute or two; later runs reuse it)[/]"
            )


def stale_build_locks(root: Path) -> list[Path]:
    """The `lock` files of torch extension builds under `root` (its own folders, or the per-Python
    ones of the default cache) that no process on this machine has open. Empty where that cannot be
    told (no /proc)."""
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    if not locks or not Path("/proc/self/fd").is_dir():
        return []
    candidates = [lock for lock in locks if not _open_by_a_process(lock)]
    if candidates:  # a holder closes the file just before it deletes it: look again past that moment
        time.sleep(0.2)
        candidates = [lock for lock in candidates if lock.exists() and not _open_by_a_process(lock)]
    return candidates


def _open_by_a_process(path: Path) -> bool:
    target = os.path.realpath(path)
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            entries = list(fds.iterdir())
        except OSError:  # the process ended, or it is another user's (whose locks are not in our cache)
            continue
        for fd in entries:
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(fd) == target:
                    return True
    return False
