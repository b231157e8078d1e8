"""The run directory, the contract between commands, and atomic writes into it.

    runs/<name>/
      recipe.yaml          the frozen, fully resolved recipe
      metrics.jsonl        one JSON line per step (and per eval)
      base-model/          the built tiny-gptj (only when the recipe uses it)
      checkpoints/step-N/  model or adapter (or ZeRO/FSDP shards), optimizer, scheduler, RNG per process
      trackers/            TensorBoard, MLflow and W&B files (logging.trackers, train/track.py)
      failed.json          written when an error stopped training; removed by a resume
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
from .manifest import sync_file, sync_folder, sync_tree
from .recipe import TINY_MODEL_NAME, Recipe

STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temp folder; on success it replaces `target` (the old one is removed only after)."""
    target = Path(target)
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]  # deepest first
    _make_parents(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # the parents made for it, unless something else was put there meanwhile
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    sync_tree(tmp)  # whole on the disk before it has the target's name
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    sync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temp_path)`, then the temp file replaces `path`: an earlier file is replaced whole or
    not at all, and a write that fails leaves no temp file behind."""
    path = Path(path)
    _make_parents(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        write(tmp)
        sync_file(tmp)  # a crash after the rename finds the whole file, not an empty one
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _make_parents(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir())
        raise RunDirError(f"cannot write {target}: {blocking} is a file, not a folder") from None


def guard_output(target: str | Path, option: str, guarded: list[tuple[str | Path, str, bool]]) -> None:
    """Refuse `target`, a folder a command writes or replaces, where that would delete or write into
    something that must be kept. `guarded` holds (path, what it is, whether writing inside it is
    fine); the target may never be one of those paths or hold one, and may not lie inside one
    unless its entry allows it. The current directory is always guarded (writing inside it is fine),
    and a file is never replaced by a folder."""
    t = Path(target).resolve()
    if t.exists() and not t.is_dir():
        raise RunDirError(f"{option} {target} is a file; it names a folder to write, choose another")
    for path, what, inside_ok in [*guarded, (Path.cwd(), "the current directory", True)]:
        p = Path(path).resolve()
        if t == p or t in p.parents:
            held = "that is" if t == p else "it holds"
            raise RunDirError(f"{option} {target}: {held} {what} ({path}), which must not be replaced or deleted; "
                              f"choose another folder")  # fmt: skip
        if not inside_ok and p in t.parents:
            raise RunDirError(f"{option} {target}: that is inside {what} ({path}); choose a folder outside it")


def warn(text: str) -> None:
    """A warning on stderr, for commands that print their results on stdout."""
    import sys

    print(f"warning: {text}", file=sys.stderr)


def refuse_damaged(folder: Path) -> None:
    """A final/ (or any folder with a manifest) that does not match its manifest is an error."""
    from .manifest import verify

    if (problem := verify(folder)) is not None:
        raise RunDirError(f"{folder} is damaged ({problem}); it cannot be used: finish the run again from a checkpoint "
                          f"({RunDir(folder.parent).resume_command()}) or export a checkpoint (--checkpoint latest)")  # fmt: skip


def is_frozen_recipe(path: Path) -> bool:
    """Whether the file is exactly what a run writes as its recipe.yaml (canonical, fully resolved), as
    opposed to a recipe someone wrote, with comments and defaults left out."""
    from .errors import GptjTuneError
    from .recipe import load_recipe

    try:
        return load_recipe(path).to_yaml() == Path(path).read_text(encoding="utf-8")
    except (GptjTuneError, OSError, UnicodeDecodeError):
        return False


def run_inputs(recipe: Recipe) -> list[tuple[str, str, bool]]:
    """The recipe's local inputs (model, tokenizer, data, DeepSpeed config), as `guard_output` entries."""
    found = [(recipe.model.name_or_path, "the base model"), (recipe.model.tokenizer, "the tokenizer"),
             (recipe.distributed.deepspeed.config if recipe.distributed.deepspeed else None, "the DeepSpeed config"),
             (recipe.distributed.hostfile, "the hostfile"),
             *((s.path, "a data source") for s in recipe.data.sources)]  # fmt: skip
    return [(path, what, False) for path, what in found if path and Path(path).exists()]


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

    def resume_command(self) -> str:
        """The command that continues this run, from where it was started: its frozen recipe holds
        every `--set` value it ran with."""
        import shlex

        return f"gptj-tune run {shlex.quote(str(self.recipe))} --resume"

    def guarded(self) -> list[tuple[Path, str, bool]]:
        """The run directory and what in it a report or export must never replace, for `guard_output`."""
        return [(self.path, "the run directory", True), (self.final, "the run's final model", False),
                (self.checkpoints, "the run's checkpoints", False), (self.path / "base-model", "the run's base model", False)]  # fmt: skip

    def is_used(self) -> bool:
        """Whether a new start would lose something here: results of a run (a logged step, a checkpoint,
        a final model) or a recipe.yaml that is not one a run froze (someone's own file)."""
        return self.has_results() or (self.recipe.exists() and not is_frozen_recipe(self.recipe))

    def has_results(self) -> bool:
        return self.metrics.exists() or self.checkpoints.exists() or self.final.exists() or self.summary.exists()

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

    def checkpoint(self, which: str | bool, warn: Callable[[str], None] | None = None) -> Path:
        """`True`/`latest` -> the newest intact checkpoint; `step-N` -> that one. Each is verified
        against its manifest: `latest` passes over a damaged one (`warn` says which and why) to the
        one before; a damaged `step-N` is an error. Raises RunDirError if none is usable."""
        from .manifest import verify

        found = self.list_checkpoints()
        names = ", ".join(p.name for _, p in found) or "none"
        if which in (True, "latest"):
            if not found:
                how = f"with --force (deletes {self.path})" if self.has_results() else "without --resume"
                raise RunDirError(f"{self.path}: no checkpoint to resume from (checkpoints: {names}); it stopped before "
                                  f"its first checkpoint: start it again {how}")  # fmt: skip
            damaged = []
            for _, p in reversed(found):
                problem = verify(p)
                if problem is None:
                    if damaged and warn is not None:
                        warn(f"{'; '.join(damaged)}: using {p.name}, the newest intact checkpoint")
                    return p
                damaged.append(f"{p} is damaged ({problem})")
            raise RunDirError(f"{self.path}: every checkpoint is damaged ({'; '.join(damaged)}); start the run again with --force")
        for _, p in found:
            if p.name == which:
                if (problem := verify(p)) is not None:
                    intact = [q.name for _, q in found if q != p and verify(q) is None]
                    other = f"intact: {', '.join(intact)}" if intact else "no other checkpoint is intact"
                    raise RunDirError(f"{p} is damaged ({problem}); pick another checkpoint ({other})")
                return p
        raise RunDirError(f"{self.path}: no checkpoint {which!r}; available: {names}")

    def prune_checkpoints(self, keep_last: int) -> None:
        for _, p in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def prepare_run_dir(recipe: Recipe, resume: str | bool, force: bool, create: bool = True,
                    warn: Callable[[str], None] | None = None) -> tuple[RunDir, Path | None]:  # fmt: skip
    """Check the run dir against the request; write the frozen recipe. Returns (run, checkpoint to load).

    Only the main process creates (`create`) and picks the checkpoint to resume (verifying it, see
    RunDir.checkpoint); the others, which run after it, only look, and are told its pick."""
    import shutil

    run = RunDir(recipe.output.dir)
    if resume:
        if not run.recipe.exists():
            raise RunDirError(f"--resume: {run.path} holds no run (no recipe.yaml); start it without --resume")
        if create:  # what a killed save left (the run lock makes this the only writer)
            for leftover in [*run.checkpoints.glob(".partial-step-*"), *run.path.glob(".tmp-*"), *run.path.glob(".old-*")]:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        checkpoint = run.checkpoint(resume, warn) if create else None
        diff = _recipe_diff(run.recipe.read_text(), recipe.to_yaml())
        if diff:
            raise RunDirError(
                f"--resume: the recipe differs from the one {run.path} was started with at: {diff}. Resume "
                f"with the same recipe and --set values (its own: {run.resume_command()}), or start a new run (output.dir)."
            )
        return run, checkpoint
    if not create:
        return run, None
    if run.is_used():
        if not force and not run.has_results():
            raise RunDirError(
                f"{run.path} holds a recipe.yaml that no run wrote there (a run writes its own recipe.yaml): move "
                f"that file, or --set output.dir=runs/NEW for the run."
            )
        if not force and not run.list_checkpoints() and not run.final.exists():
            raise RunDirError(
                f"{run.path} holds a run that stopped before its first checkpoint, so there is nothing to resume: start "
                f"it again with --force (deletes {run.path}), or --set output.dir=runs/NEW for a new run."
            )
        if not force:
            raise RunDirError(
                f"{run.path} already holds a run. Use --resume to continue it, --force to delete it and start "
                f"over, or --set output.dir=runs/NEW for a new run."
            )
        guard_output(run.path, "output.dir (which --force deletes)", run_inputs(recipe))
        shutil.rmtree(run.path)
    elif run.recipe.exists():  # its frozen recipe, no results: a start that stopped in setup, begun again
        # the built tiny base, the data cache, trackers that logged no step
        for leftover in (run.path / "base-model", run.path / "cache", run.path / "trackers"):
            if leftover.exists():
                shutil.rmtree(leftover)
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
    # model.tiny shapes nothing but tiny-gptj (earlier versions froze its defaults for every model)
    tiny = TINY_MODEL_NAME in (a.get("model.name_or_path"), b.get("model.name_or_path"))
    keys = sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and k not in free and (tiny or not k.startswith("model.tiny.")))  # fmt: skip
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys[:6])


def rewind_metrics(run: RunDir, step: int) -> int:
    """Drop metric lines after `step` so a resumed run's metrics.jsonl is one clean curve, and the
    end-of-run line (the resumed run writes its own). A line that is not a JSON record (cut short
    when the disk filled or the process died mid-write) is dropped too. Returns how many such
    lines were dropped."""
    if not run.metrics.exists():
        return 0
    kept, damaged = [], 0
    for line in run.metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            damaged += bool(line.strip())
            continue
        if record["step"] <= step and "final_eval_loss" not in record:
            kept.append(line)
    atomic_write_text(run.metrics, "".join(line + "\n" for line in kept))
    return damaged
