"""`gptj-tune runs` (the run directories under a folder: status and figures) and `gptj-tune compare`
(runs side by side: the recipe keys that differ, the figures, one PNG of their loss curves)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import RunDirError
from .rundir import RunDir
from .runlock import RunLock


@dataclass
class RunInfo:
    path: Path
    status: str
    method: str = "?"
    model: str = "?"
    steps: int = 0
    last_loss: float | None = None
    held_out_loss: float | None = None
    exact_match: float | None = None
    tokens_per_s: float | None = None
    wall_s: float | None = None
    flat: dict = field(default_factory=dict)  # the recipe as dotted keys
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and ((path / "metrics.jsonl").exists() or (path / "checkpoints").exists()
                                                 or (path / "summary.json").exists())  # fmt: skip


def read_run(path: Path) -> RunInfo:
    """A run directory's status and figures, from its files alone (nothing is loaded)."""
    from .recipe import load_recipe
    from .train.track import flat_recipe

    run = RunDir(path)
    lines = _metrics(run)
    steps = [r for r in lines if "loss" in r]
    info = RunInfo(path, status="")
    info.curve = [(r["step"], r["loss"]) for r in steps]
    info.held_out = [(r["step"], r["eval_loss"]) for r in lines if isinstance(r.get("eval_loss"), (int, float))]
    info.steps = steps[-1]["step"] if steps else 0
    info.last_loss = steps[-1]["loss"] if steps else None
    info.held_out_loss = info.held_out[-1][1] if info.held_out else None
    if steps:
        info.tokens_per_s, info.wall_s = steps[-1].get("tokens_per_s"), steps[-1].get("elapsed_s")
    try:
        recipe = load_recipe(run.recipe)
        info.method, info.model, info.flat = recipe.method.kind, str(recipe.model.name_or_path), flat_recipe(recipe)
    except Exception as e:  # a damaged recipe is a row saying so, not the end of the listing
        info.method = f"(recipe unreadable: {type(e).__name__})"
    final = next((r for r in reversed(lines) if "final_eval_loss" in r), None)
    if final:
        info.held_out_loss, info.exact_match = final["final_eval_loss"], final.get("exact_match")
    summary = _json(run.summary)
    if summary:
        info.tokens_per_s = summary["tokens"] / max(summary["seconds"], 1e-9)
        info.wall_s, info.steps = summary["seconds"], summary["steps"]
    info.status = _status(run, info, summary, lines)
    return info


def _status(run: RunDir, info: RunInfo, summary: dict | None, lines: list[dict]) -> str:
    if RunLock(run.path).held():
        return f"running (step {info.steps})"
    failed = _json(run.path / "failed.json")
    if failed:
        return f"failed at step {failed.get('step', info.steps)}: {failed.get('message', '')}"
    if summary:
        return "finished"
    saved = run.list_checkpoints()
    resumable = f", resumable from {saved[-1][1].name}" if saved else ", no checkpoint"
    return f"interrupted at step {info.steps}{resumable}"


def _metrics(run: RunDir) -> list[dict]:
    out = []
    if run.metrics.exists():
        for line in run.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def list_runs(folder: Path) -> list[RunInfo]:
    if not folder.is_dir():
        raise RunDirError(f"{folder} is not a folder; give the folder that holds run directories (default runs/)")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and is_run_dir(p))
    return [read_run(p) for p in found]


def differing_keys(runs: list[RunInfo]) -> list[str]:
    """Recipe keys whose values differ between the runs (`output.dir` aside: it always does)."""
    keys = sorted(set().union(*(r.flat for r in runs)) - {"output.dir"})
    return [k for k in keys if len({json.dumps(r.flat.get(k)) for r in runs}) > 1]


def plot_curves(runs: list[RunInfo], out: Path) -> Path:
    """Training loss of each run over steps, its held-out losses as points, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .rundir import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        line = ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], label=f"{r.path.name} (train)", linewidth=1.2)[0]
        if r.held_out:
            ax.plot([s for s, _ in r.held_out], [v for _, v in r.held_out], "o", color=line.get_color(),
                    label=f"{r.path.name} (held out)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.set_title("Runs compared")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def figures(r: RunInfo) -> dict[str, str]:
    """A run's summary figures as table cells."""

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    wall = "-" if r.wall_s is None else f"{r.wall_s / 60:.1f} min" if r.wall_s >= 120 else f"{r.wall_s:.0f} s"
    return {"status": r.status, "method": r.method, "model": r.model, "steps": str(r.steps), "last loss": num(r.last_loss, ".4f"),
            "held-out loss": num(r.held_out_loss, ".4f"), "exact match": num(r.exact_match, ".3f"),
            "tokens/s": num(r.tokens_per_s, ",.0f"), "wall time": wall}  # fmt: skip


def _wide(console: Console) -> Console:
    """Tables whole when piped (rich would squeeze them into 80 columns)."""
    return console if console.is_terminal else Console(width=220, file=console.file, highlight=False)


def print_runs(folder: Path, console: Console) -> None:
    found = list_runs(folder)
    if not found:
        console.print(f"no run directories under {escape(str(folder))}")
        return
    table = Table("run", *figures(found[0]).keys(), title=f"runs under {escape(str(folder))}")
    for r in found:
        table.add_row(escape(r.path.name), *(escape(v) for v in figures(r).values()))
    _wide(console).print(table)


def print_comparison(paths: list[Path], out: Path, console: Console) -> None:
    if len(paths) < 2:
        raise RunDirError("compare needs two or more run directories")
    for path in paths:
        if not is_run_dir(path):
            raise RunDirError(f"{path} is not a run directory (no recipe.yaml with metrics or checkpoints beside it)")
    infos = [read_run(p) for p in paths]
    names = [escape(r.path.name) for r in infos]
    keys = differing_keys(infos)
    table = Table("recipe key", *names, title="where the recipes differ" if keys else "the recipes are the same (output.dir aside)")
    for key in keys:
        table.add_row(key, *(escape(str(r.flat.get(key, "(absent)"))) for r in infos))
    _wide(console).print(table)
    table = Table("", *names, title="figures")
    for name in figures(infos[0]):
        table.add_row(name, *(escape(figures(r)[name]) for r in infos))
    _wide(console).print(table)
    console.print(f"loss curves: {escape(str(plot_curves(infos, out)))}")
