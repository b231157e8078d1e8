"""Checkpoint manifests: sizes and SHA-256 per 64 MiB block, written last; a damaged checkpoint is
passed over by `--resume latest` (with a warning naming it) and refused when named."""

from __future__ import annotations

import json

import pytest

from gptj_tune import manifest
from gptj_tune.errors import RunDirError
from gptj_tune.manifest import verify, write_manifest
from gptj_tune.rundir import RunDir


def _checkpoint(root, step: int, payload: bytes = b"weights" * 1000):
    folder = root / "checkpoints" / f"step-{step}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(payload)
    (folder / "optimizer.pt").write_bytes(payload[::-1])
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(folder)
    return folder


def test_the_manifest_finds_a_changed_byte_a_cut_file_a_missing_file_and_a_damaged_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BLOCK", 4096)  # several blocks per file, hashed on every core
    folder = _checkpoint(tmp_path, 1, bytes(range(256)) * 100)
    assert verify(folder) is None
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(listed) == ["model/model.safetensors", "optimizer.pt", "trainer_state.json"]
    assert len(listed["optimizer.pt"]["sha256"]) == 7  # 25,600 bytes in 4 KiB blocks

    data = bytearray((folder / "optimizer.pt").read_bytes())
    data[20_000] ^= 1  # in the fifth block: the size is unchanged
    (folder / "optimizer.pt").write_bytes(bytes(data))
    assert verify(folder) == "optimizer.pt does not hold what was saved (its SHA-256 differs)"
    data[20_000] ^= 1
    (folder / "optimizer.pt").write_bytes(bytes(data[:100]))
    assert verify(folder) == "optimizer.pt has 100 bytes, 25,600 were saved"
    (folder / "optimizer.pt").unlink()
    assert verify(folder) == "optimizer.pt is missing"
    (folder / "manifest.json").write_text('{"files": ')
    assert verify(folder) == "manifest.json is damaged (JSONDecodeError)"
    (folder / "manifest.json").unlink()
    assert verify(folder) is None  # written before checkpoints had manifests: taken as it is


def test_resume_latest_passes_over_damaged_checkpoints_and_a_named_damaged_one_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    assert run.checkpoint("latest") == tmp_path / "checkpoints" / "step-30"

    (tmp_path / "checkpoints" / "step-30" / "optimizer.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "step-20" / "model" / "model.safetensors").write_bytes(b"x" * 7000)
    warnings = []
    assert run.checkpoint("latest", warn=warnings.append) == tmp_path / "checkpoints" / "step-10"
    [warning] = warnings
    assert "step-30 is damaged (optimizer.pt has 0 bytes, 7,000 were saved)" in warning
    assert "step-20 is damaged (model/model.safetensors does not hold what was saved" in warning
    assert warning.endswith("using step-10, the newest intact checkpoint")

    with pytest.raises(RunDirError, match=r"step-20 is damaged \(model/model.safetensors .*\); pick another checkpoint \(intact: step-10\)"):
        run.checkpoint("step-20")
    assert run.checkpoint("step-10") == tmp_path / "checkpoints" / "step-10"
    (tmp_path / "checkpoints" / "step-10" / "trainer_state.json").write_text("{}")
    with pytest.raises(RunDirError, match="every checkpoint is damaged .*start the run again with --force"):
        run.checkpoint("latest")


_EVENTS: list[tuple[str, str]] | None = None  # what the audit hook below records while a test sets it


def _audit(event: str, args) -> None:
    if _EVENTS is not None and event in ("os.rename", "shutil.rmtree"):
        _EVENTS.append((event, str(args[0]) if event == "shutil.rmtree" else f"{args[0]} -> {args[1]}"))


def test_a_save_is_on_the_disk_before_it_is_renamed_into_place_and_before_older_checkpoints_go(tmp_path, monkeypatch):
    """A power loss or a machine crash right after a save must not find a renamed checkpoint (or
    final/) of empty files with the older checkpoints already pruned: every file and folder is
    fsynced before the rename, the rename before the pruning. The real calls, in the order made
    (os.fsync recorded on its way through; renames and removals through Python's audit hook)."""
    import os
    import sys

    from conftest import small_recipe

    from gptj_tune.recipe import load_recipe
    from gptj_tune.train.loop import train

    global _EVENTS
    sys.addaudithook(_audit)
    real_fsync = os.fsync

    def fsync(fd):
        _EVENTS.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    recipe = small_recipe(tmp_path, steps=4, save_every=2)
    recipe.write_text(recipe.read_text().replace("keep_last: 10", "keep_last: 1"))
    monkeypatch.setattr(os, "fsync", fsync)
    _EVENTS = []
    try:
        train(load_recipe(recipe))
        events = list(_EVENTS)
    finally:
        _EVENTS = None
    run = (tmp_path / "run").resolve()

    def at(event: str, where) -> int:
        return next(i for i, (e, what) in enumerate(events) if e == event and where(what))

    renamed = at("os.rename", lambda w: w.endswith(str(run / "checkpoints" / "step-4")))
    partial = str(run / "checkpoints" / ".partial-step-4")
    synced = {what for e, what in events[:renamed] if e == "fsync" and what.startswith(partial)}
    saved = {str(p).replace(str(run / "checkpoints" / "step-4"), partial) for p in (run / "checkpoints" / "step-4").rglob("*")}
    assert saved <= synced and partial in synced  # every file and folder, before the rename
    each = [w for e, w in events[:renamed] if e == "fsync" and w.startswith(partial)]
    assert len(each) == len(set(each))  # once each: a 6B checkpoint's 60 GB are not flushed twice
    folder_synced = next(i for i, (e, w) in enumerate(events) if i > renamed and e == "fsync" and w == str(run / "checkpoints"))
    assert renamed < folder_synced < at("shutil.rmtree", lambda w: w == str(run / "checkpoints" / "step-2"))  # then the pruning
    final = at("os.rename", lambda w: w.endswith(str(run / "final")))
    synced = {what for e, what in events[:final] if e == "fsync"}
    assert {str(p) for p in (run / "final").rglob("*")} <= {w.replace(".tmp-final-" + str(os.getpid()), "final") for w in synced}
    assert not (run / "checkpoints" / "step-2").exists()
