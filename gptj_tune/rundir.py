"""The run directory, the contract between commands, and atomic writes into it.

    runs/<name>/
      recipe.yaml          the frozen, fully resolved recipe
      metrics.jsonl        one JSON line per step (and per eval)
      base-model/          the built tiny-gptj (only when the recipe uses it)
      checkpoints/step-N/  model or adapter (or ZeRO/FSDP shards), optimizer, scheduler, RNG per process
      cache/               tokenized data shared by the processes of a multi-process run
      final/               the trained model or adapter, with the tokenizer
      summary.json         steps, tokens, losses, wall time, exact match

Everything is written to a temporary sibling and renamed into place, so a crash or Ctrl-C never
leaves a half-written checkpoint, final model or file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import RunDirError
from .recipe import Recipe

STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temp folder; on success it replaces `target` (the old one is removed only after)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temp_path)`, then the temp file replaces `path`: an earlier file is replaced whole or
    not at all, and a write that fails leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")
    summary = property(lambda self: self.path / "summary.json")

    def is_used(self) -> bool:
        return self.recipe.exists() or self.checkpoints.exists() or self.final.exists()

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def checkpoint(self, which: str | bool) -> Path:
        """`True`/`latest` -> the newest checkpoint; `step-N` -> that one. Raises RunDirError if absent."""
        found = self.list_checkpoints()
        names = ", ".join(p.name for _, p in found) or "none"
        if which in (True, "latest"):
            if not found:
                raise RunDirError(f"{self.path}: no checkpoint to resume from (checkpoints: {names})")
            return found[-1][1]
        for _, p in found:
            if p.name == which:
                return p
        raise RunDirError(f"{self.path}: no checkpoint {which!r}; available: {names}")

    def prune_checkpoints(self, keep_last: int) -> None:
        for _, p in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def prepare_run_dir(recipe: Recipe, resume: str | bool, force: bool, create: bool = True) -> tuple[RunDir, Path | None]:
    """Check the run dir against the request; write the frozen recipe. Returns (run, checkpoint to load).

    Only the main process creates (`create`); the others, which run after it, only look."""
    import shutil

    run = RunDir(recipe.output.dir)
    if resume:
        if not run.recipe.exists():
            raise RunDirError(f"--resume: {run.path} holds no run (no recipe.yaml); start it without --resume")
        diff = _recipe_diff(run.recipe.read_text(), recipe.to_yaml())
        if diff:
            raise RunDirError(
                f"--resume: the recipe differs from the one {run.path} was started with at: {diff}. Resume "
                f"with the same recipe and --set values, or start a new run (output.dir)."
            )
        return run, run.checkpoint(resume)
    if not create:
        return run, None
    if run.is_used():
        if not force:
            raise RunDirError(
                f"{run.path} already holds a run. Use --resume to continue it, --force to delete it and start "
                f"over, or --set output.dir=runs/NEW for a new run."
            )
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe, recipe.to_yaml())
    return run, None


def _recipe_diff(old: str, new: str) -> str:
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, (dict, list)) and v else {key: v})
        return out

    a, b = flat(yaml.safe_load(old)), flat(yaml.safe_load(new))
    # output.dir may differ (a run directory can be moved and still resumed), and so does each
    # machine's machine_rank in a multi-machine job.
    free = {"output.dir", "distributed.machine_rank"}
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in free)
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys[:6])


def rewind_metrics(run: RunDir, step: int) -> None:
    """Drop metric lines after `step` so a resumed run's metrics.jsonl is one clean curve."""
    if not run.metrics.exists():
        return
    kept = [line for line in run.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(run.metrics, "".join(line + "\n" for line in kept))
