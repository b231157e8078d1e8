"""A full disk and damaged checkpoints, for real: runs write into a small tmpfs mounted in a mount
namespace of their own (`unshare -rm`, no root needed where user namespaces are allowed), which is
resized to "free space". Each case is one message, exit 2, no temp folder, every earlier
checkpoint kept, and `--resume` afterwards ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, cli, small_recipe

pytestmark = pytest.mark.slow


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount = pytest.mark.skipif(not _can_mount(), reason="cannot mount a tmpfs in a user namespace here (unshare -rm)")


def _bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _in_tmpfs(tmp_path, size_kb: int, commands: list[list[str]], listed: str = "run") -> list[tuple[int, str, list[str]]]:
    """Run `gptj-tune` commands in turn against a tmpfs of `size_kb` mounted at tmp_path/disk (the
    literal command "grow" resizes it to 64 MB: space freed); for each, its exit code, its last
    stderr line and what the folder `listed` on it (the run directory) then holds (hidden files
    included)."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    script = [f"mount -t tmpfs -o size={size_kb}k tmpfs {disk}"]
    for i, command in enumerate(commands):
        if command == ["grow"]:
            script.append(f"mount -o remount,size=64m {disk}")
            continue
        log = tmp_path / f"log-{i}"
        script += [f"{shlex.join([sys.executable, '-m', 'gptj_tune', *command])} > {log}.out 2> {log}.err; echo $? > {log}.rc",
                   f"(cd {disk}/{listed} && find . | sort) > {log}.files 2>/dev/null",
                   f"cp -r {disk}/run {tmp_path}/after-{i} 2>/dev/null || true"]  # fmt: skip
    subprocess.run(["unshare", "-rm", "bash", "-c", "\n".join(script)], check=True, timeout=900)
    out = []
    for i, command in enumerate(commands):
        if command != ["grow"]:
            log = tmp_path / f"log-{i}"
            errors = log.with_suffix(".err").read_text().strip().splitlines() or [""]
            assert "Traceback" not in log.with_suffix(".err").read_text()
            out.append((int(log.with_suffix(".rc").read_text()), errors[-1], log.with_suffix(".files").read_text().split()))
    return out


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _same_weights(a, b) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@needs_mount
def test_a_full_disk_is_refused_before_training_and_fails_a_checkpoint_or_final_save_cleanly(tmp_path):
    recipe = small_recipe(tmp_path, method="full", steps=20, save_every=10, lr=1e-3, out=tmp_path / "disk" / "run")
    recipe.write_text(recipe.read_text().replace("keep_last: 10", "keep_last: 2"))
    reference = tmp_path / "reference"
    assert cli("run", str(recipe), "--set", f"output.dir={reference}").returncode == 0
    base, checkpoint = _bytes(reference / "base-model"), _bytes(reference / "checkpoints" / "step-10")
    final, small = _bytes(reference / "final"), 64 * 1024  # small: recipe.yaml, metrics.jsonl and slack
    off = ["--set", "train.check_disk=false"]  # the writes themselves fail, not the check before them

    # 1. Before training: what the run needs against what is free; nothing is trained
    [(code, message, files)] = _in_tmpfs(tmp_path, (base + small + 1_000_000) // 1024, [["run", str(recipe)]])
    assert code == 2 and "the run needs" in message and "train.keep_last 2" in message, message
    assert "lower train.keep_last, set output.dir on a larger disk" in message
    assert files == [".", "./base-model", *sorted(f"./base-model/{p.name}" for p in (reference / "base-model").iterdir()),
                     "./recipe.yaml"]  # fmt: skip

    # 2. The second checkpoint does not fit: the first is kept, no temp folder; more space, --resume
    size = (base + checkpoint + small + checkpoint // 2) // 1024
    failed, resumed = _in_tmpfs(tmp_path, size, [["run", str(recipe), *off], ["grow"], ["run", str(recipe), *off, "--resume"]])
    code, message, files = failed
    assert code == 2 and message.startswith("error: not enough disk to save checkpoint step-20 in"), message
    assert re.search(r"continue from step-10 with: gptj-tune run /\S+/recipe\.yaml --resume", message), message
    assert not any("partial" in f or ".tmp" in f for f in files) and "./checkpoints/step-10/manifest.json" in files
    assert resumed[0] == 0, resumed
    assert _losses(tmp_path / "after-2") == _losses(reference)
    _same_weights(tmp_path / "after-2" / "final", reference / "final")

    # 3. final/ does not fit after the last checkpoint: --resume saves it without training again
    size = (base + 2 * checkpoint + small + final // 2) // 1024
    failed, resumed = _in_tmpfs(tmp_path, size, [["run", str(recipe), *off], ["grow"], ["run", str(recipe), *off, "--resume"]])
    code, message, files = failed
    assert code == 2 and message.startswith("error: not enough disk to save final/ in"), message
    assert "(it saves final/ from step-20, no training again)" in message
    assert "./final" not in files and not any(".tmp" in f for f in files)
    assert resumed[0] == 0, resumed
    after = tmp_path / "after-2"
    assert _losses(after) == _losses(reference)  # no step trained twice, no line twice
    _same_weights(after / "final", reference / "final")


@needs_mount
def test_a_full_disk_while_preparing_data_or_exporting_is_one_line_and_leaves_nothing(tmp_path, shared_data):
    """The token store's cache and an export's --out on a disk that fills: before, NumPy's short
    write (`497664 requested and 305152 written`, no errno) and safetensors' error were tracebacks."""
    cache = tmp_path / "disk" / "cache"
    prepare = ["data", "prepare", str(REPO / "recipes" / "novel-domain.yaml"), "--set", f"model.tokenizer={shared_data / 'gpt2-tokenizer'}",
               "--set", f"data.sources.0.path={shared_data / 'domain'}", "--set", f"data.cache_dir={cache}"]  # fmt: skip
    failed, grown = _in_tmpfs(tmp_path, 600, [prepare, ["grow"], prepare], listed="cache")  # the store takes ~3 MB
    code, message, files = failed
    assert code == 2 and message.startswith("error: the disk of data.cache_dir ("), message
    assert "the unfinished store was removed" in message and "set data.cache_dir to a disk with room" in message
    assert files == ["."]  # no temporary folder, no build lock
    assert grown[0] == 0, grown

    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    assert cli("run", str(recipe)).returncode == 0
    [(code, message, files)] = _in_tmpfs(tmp_path, 256, [  # the small model in float32: ~650 KB
        ["export", str(tmp_path / "run"), "--out", str(tmp_path / "disk" / "out" / "m"), "--dtype", "float32"]], listed=".")  # fmt: skip
    assert code == 2 and message.startswith("error: the disk of --out ("), message
    assert "the unfinished export was removed" in message and "choose another --out" in message
    assert files == ["."]  # no temporary folder, nor the parent it made
    # a command with no disk message of its own (compare's PNG): one line all the same
    [(code, message, files)] = _in_tmpfs(tmp_path, 8, [["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--out",
                                                        str(tmp_path / "disk" / "c.png")]], listed=".")  # fmt: skip
    assert code == 2 and message.startswith("error: the disk is full (") and "nothing half-written was left" in message, message
    assert files == ["."]


def test_damaged_checkpoints_resume_from_the_newest_intact_one_and_are_refused_by_name(tmp_path):
    recipe = small_recipe(tmp_path, steps=20, save_every=5)
    reference = tmp_path / "reference"
    assert cli("run", str(recipe), "--set", f"output.dir={reference}").returncode == 0
    assert cli("run", str(recipe)).returncode == 0
    run = tmp_path / "run"
    (run / "checkpoints" / "step-20" / "optimizer.pt").write_bytes(b"")  # an empty file
    adapter = run / "checkpoints" / "step-15" / "model" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 1  # one bit of a weight: same size, still a valid safetensors file
    adapter.write_bytes(bytes(data))

    result = cli("export", str(run), "--checkpoint", "step-15", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert "step-15 is damaged (model/adapter_model.safetensors does not hold what was saved" in result.stderr
    assert "(intact: step-5, step-10)" in result.stderr and "Traceback" not in result.stderr

    result = cli("run", str(recipe), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step-20 is damaged (optimizer.pt has 0 bytes" in result.stdout.replace("\n", " ")
    assert "Resumed from" in result.stdout and "step-10 at step 10/20" in result.stdout.replace("\n", "")
    assert _losses(run) == _losses(reference)

    (run / "final" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    result = cli("eval", str(run), "--limit", "2")
    assert result.returncode == 2 and "final is damaged (adapter_model.safetensors has 64 bytes" in result.stderr
