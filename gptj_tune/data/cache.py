"""The shared cache of token stores: one folder per content key, built once, read by every run.

The key covers everything the tokens depend on: the data section (sources, template, max_length,
packing, split, format options), the tokenizer's own definition (its serialized JSON, not its
name), the soft prompt's slots, and for each local source file its path, size and modification
time. A changed file, tokenizer or option gives a new key; a changed learning rate or a resume does
not, so those runs start from the store at once.

An entry is built in a temporary folder beside it and renamed into place, so a reader never sees a
half-built store. One builder per entry at a time, on one machine or on several sharing the
filesystem: the builder holds `KEY.building` (created with O_EXCL, touched every few seconds);
the others wait for the entry, and take over a lock whose process has ended (same host) or that
nobody has touched for STALE_AFTER seconds (removing the temporary folders its builder left).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from ..errors import DataError
from ..heartbeat import FILE_GONE, Heartbeat, holder_gone, read_holder
from ..manifest import sync_folder, sync_tree
from ..recipe import DataSection
from ..recipe.inputs import CHAT_KEYS
from ..recipe.load import is_pattern, matches
from .store import FORMAT_VERSION

HEARTBEAT = 5.0
STALE_AFTER = 60.0


CHAT_READING = 4  # 2: replies' `weight` (0: not learned), OpenAI's content parts, ShareGPT's top-level `system`; 3: tool calls; 4: a reply that opens a conversation learned after its header


def default_cache_dir() -> Path:
    """GPTJ_TUNE_DATA_CACHE, else $XDG_CACHE_HOME/gptj-tune/data, else ~/.cache/gptj-tune/data."""
    if os.environ.get("GPTJ_TUNE_DATA_CACHE"):
        return Path(os.environ["GPTJ_TUNE_DATA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gptj-tune" / "data"


def cache_dir_of(section: DataSection) -> Path:
    return Path(section.cache_dir) if section.cache_dir else default_cache_dir()


def cache_key(section: DataSection, tokenizer, prompt_slots: int) -> str:
    spec = {
        "format_version": FORMAT_VERSION,
        "data": _data_spec(section),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "prompt_slots": prompt_slots,
        "files": [_files_fingerprint(s.path) for s in section.sources],
    }
    if any(s.format == "chat" for s in section.sources):  # how conversations are read changed: a store built
        spec["chat_reading"] = CHAT_READING  # before reads them as then (a `weight` 0 reply learned) and is not reused
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _data_spec(section: DataSection) -> dict:
    """The data section as the key sees it: settings added after stores existed count only when set
    (ADDED_DATA_KEYS, ADDED_SOURCE_KEYS), so a store built before them keeps its key."""
    spec = section.model_dump(mode="json", exclude={"cache_dir", "workers"})  # where and how fast, not what
    for key, default in ADDED_DATA_KEYS.items():
        if spec.get(key) == default:
            spec.pop(key)
    for source in spec["sources"]:
        for key, default in ADDED_SOURCE_KEYS.items():
            if source.get(key) == default:
                source.pop(key, None)
    return spec


# Keys added to the data section after stores were first built, with their defaults: at the
# default they are left out of the key, so an existing store keeps its key (a new key is added here).
ADDED_DATA_KEYS = {"learn_replies": "all", "deduplicate": False}
ADDED_SOURCE_KEYS = {**{key: None for key in CHAT_KEYS}, "subset": None}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    text += json.dumps([tokenizer.eos_token_id, len(tokenizer)])
    return hashlib.sha256(text.encode()).hexdigest()


def _files_fingerprint(path: str | None) -> list:
    """(relative path, size, mtime) of a local source's files (those a glob pattern matches: its
    absolute paths); a hub id or synthetic data: nothing."""
    if path is None:
        return []
    root = Path(path)
    if is_pattern(path):
        files = matches(path)
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    elif root.exists():
        files = [root]
    else:
        return []
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(root)) if root.is_dir() else str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def open_or_build(root: Path, key: str, build: Callable[[Path], None], waiting: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """The entry `root/key`, built by `build(folder)` unless it exists or another process builds it
    (then this one waits). Returns (entry, whether this call built it)."""
    entry = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot create {root} ({e.strerror}); set data.cache_dir to a writable folder") from None
    told = False
    while not entry.exists():
        lock = _BuildLock(root / f"{key}.building")
        try:  # (acquired inside: a stop signal at any moment after the lock is taken releases it)
            if lock.acquire():
                if entry.exists():  # finished between our look and our lock
                    return entry, False
                for orphan in root.glob(f".tmp-{key}-*"):  # what a builder that died left (we hold the lock)
                    shutil.rmtree(orphan, ignore_errors=True)
                _build_into(root, entry, build)
                return entry, True
        finally:
            if lock.held:
                lock.release()
        if waiting and not told:
            waiting(f"another process ({lock.holder()}) is preparing this data; waiting for {entry}")
            told = True
        time.sleep(0.5)
    return entry, False


def _build_into(root: Path, entry: Path, build: Callable[[Path], None]) -> None:
    from ..train.disk import free_bytes, is_disk_full, size

    tmp = root / f".tmp-{entry.name}-{secrets.token_hex(4)}"
    try:  # (made inside: a stop signal right after mkdir still removes it)
        tmp.mkdir()
        try:
            build(tmp)
        except Exception as e:
            if not is_disk_full(e):
                raise
            written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            raise DataError(f"the disk of data.cache_dir ({root}) is full: the token store had {size(written)} written and "
                            f"{size(free_bytes(root))} is free; the unfinished store was removed. Free space there, or set "
                            f"data.cache_dir to a disk with room (a store takes about 3 bytes a token), then run the "
                            f"command again") from None  # fmt: skip
        sync_tree(tmp)  # a crash after the rename must not leave a store of zeros that later runs read
        try:
            os.rename(tmp, entry)
            sync_folder(root)
        except OSError:
            if not entry.exists():
                raise
            # Another builder's entry landed first (a lock taken over as stale); theirs is as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _BuildLock:
    def __init__(self, path: Path):
        self.path = path
        self.held = False
        self._beat: Heartbeat | None = None

    def acquire(self, retry: bool = True) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            why = holder_gone(self.path, self._holder(), STALE_AFTER)
            if why is None or why == FILE_GONE:  # building, or released just now (look for the entry)
                return False
            self.path.unlink(missing_ok=True)  # its builder died: take it now (once; another taker may win)
            return retry and self.acquire(retry=False)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            self._beat = Heartbeat(self.path, HEARTBEAT, "gptj-tune data lock").start()
            self.held = True
        except BaseException:  # a stop signal (or a full disk) between creating the lock and holding it
            self.release()
            raise
        return True

    def _holder(self) -> dict:
        return read_holder(self.path)

    def holder(self) -> str:
        who = self._holder()
        return f"pid {who['pid']} on {who['host']}" if "pid" in who and "host" in who else "unknown"

    def release(self) -> None:
        if self._beat:
            self._beat.stop(wait=True)
        self.path.unlink(missing_ok=True)
        self.held = False
