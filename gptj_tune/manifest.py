"""Checkpoints that prove themselves: `manifest.json`, written last into a checkpoint, lists every
file with its size and the SHA-256 of each 64 MiB block. `verify` reads the folder back against it.

Blocks rather than whole files so that every core hashes at once, also inside one large file (a
6B model's optimizer state is one 48 GB file): hashing runs at the speed the disk reads, and on a
resume that read also brings the files into the page cache the load reads them from.

Durable, too: `sync_tree` fsyncs every file and folder of a folder about to be renamed into place
(a checkpoint, final/, an export, a token store; the manifest is written before it), so a power
loss or a machine crash after a save cannot leave a renamed folder of empty or partly written files
while the older checkpoints were already pruned. `sync_folder` makes the rename itself durable.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
BLOCK = 64 << 20


def _block_digest(path: Path, index: int) -> str:
    with open(path, "rb") as f:
        f.seek(index * BLOCK)
        digest, left = hashlib.sha256(), BLOCK
        while left:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digests(folder: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """{relative path: [sha256 of each block]}, hashed on every core."""
    jobs = [(name, i) for name, size in sizes.items() for i in range(max(1, -(-size // BLOCK)))]
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        found = list(pool.map(lambda job: _block_digest(folder / job[0], job[1]), jobs))
    out: dict[str, list[str]] = {name: [] for name in sizes}
    for (name, _), digest in zip(jobs, found, strict=True):
        out[name].append(digest)
    return out


def write_manifest(folder: Path) -> int:
    """Hash every file under `folder` into folder/manifest.json (written last, whole). Returns the
    folder's size in bytes. The caller fsyncs the folder (`sync_tree`) before renaming it into place."""
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in _files(folder)}
    digests = _digests(folder, sizes)
    record = {"block_bytes": BLOCK, "files": {name: {"bytes": sizes[name], "sha256": digests[name]} for name in sizes}}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return sum(sizes.values())


def sync_tree(folder: Path) -> None:
    """Every file under `folder` and every folder in it fsynced: a folder about to be renamed into
    place (a checkpoint, final/, an export, a token store) is on the disk whole before its name is."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:  # the disk writes them at once
        list(pool.map(sync_file, files))
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sync_folder(sub)
    sync_folder(folder)


def sync_file(path: Path) -> None:
    """What was written to `path` is on the disk when this returns (fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(path: Path) -> None:
    """The names in folder `path` (files created, renamed or removed in it) are on the disk; where
    a filesystem cannot fsync a folder (some network ones), this is a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and contents; else what is
    wrong, in a few words. A folder without a manifest (written before checkpoints had one) is
    taken as it is."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        listed = {name: (int(v["bytes"]), list(v["sha256"])) for name, v in record["files"].items()}
        if record["block_bytes"] != BLOCK:
            return f"{MANIFEST} uses blocks of {record['block_bytes']} bytes (written by another version)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is damaged ({type(e).__name__})"
    for name, (size, _) in listed.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size:,} bytes, {size:,} were saved"
    found = _digests(folder, {name: size for name, (size, _) in listed.items()})
    for name, (_, digests) in listed.items():
        if found[name] != digests:
            return f"{name} does not hold what was saved (its SHA-256 differs)"
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
