"""`gptj-tune eval`: benchmarks (lm-eval, local files), held-out loss and instruction following for a
target and its comparison, written as eval/report.json, eval/report.md and PNG plots."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from ..errors import GptjTuneError, RunDirError, TrackerError
from ..model.prompt_tuning import is_prompt_tuning_folder
from ..rundir import RunDir, atomic_dir, guard_output, run_inputs
from ..stages import warner
from .harness import HEADLINE, PUBLISHED_GPTJ_6B, check_tasks, find_data_dir, prepare_tasks, run_benchmarks, run_benchmarks_in_memory
from .heldout import held_out_metrics
from .render import report_markdown, write_plots
from .targets import Target, load_target_model, resolve_target
GPTJ_6B_NAMES = {"EleutherAI/gpt-j-6b", "EleutherAI/gpt-j-6B"}


@dataclass
class EvalRequest:
    target: str
    tasks: list[str] | None = None
    limit: int | None = None
    data_dir: str | None = None
    batch_size: int = 8
    compare: str | None = None
    out: str | None = None
    checkpoint: str | None = None
    benchmarks: bool = True
    force: bool = False


def run_eval(request: EvalRequest, console) -> Path:
    """Evaluate the target (and its comparison) and write the report folder; returns its path."""
    import torch

    target = resolve_target(request.target, request.checkpoint)
    recipe = _recipe_of(target)
    if recipe is not None and recipe.logging.trackers:  # the report goes to them at the end: fail now, not then
        from ..train.track import check_trackers

        check_trackers(recipe)
    out = Path(request.out) if request.out else (target.run_dir / "eval" if target.run_dir else Path("eval") / _slug(target.label))
    guard_output(out, "--out", _guarded_by(target, recipe))
    if out.exists() and not request.force:
        raise RunDirError(f"{out} already holds an evaluation; pass --force to replace it, or --out DIR")
    comparison = resolve_target(request.compare) if request.compare else (
        Target(f"base model ({target.base})", {"pretrained": target.base}) if target.base else None)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = request.tasks if request.tasks is not None else (list(recipe.eval.tasks) if recipe else list(HEADLINE))
    limit = request.limit if request.limit is not None else (recipe.eval.limit if recipe else None)
    if request.benchmarks and tasks:  # a misspelt task is said before the data dir is looked for
        check_tasks(tasks)
    elif recipe is None or recipe.data.eval_fraction == 0 or recipe.data.eval_max == 0:
        why = ("the run holds no records out (data.eval_fraction or data.eval_max is 0)" if recipe is not None
               else f"{target.label} is not a run directory, so it has no held-out split")  # fmt: skip
        raise GptjTuneError(f"nothing to evaluate: no benchmark tasks (--tasks none), and {why}; name tasks with --tasks")

    report: dict = {"target": _describe(target), "harness": None, "benchmarks": {}, "held_out": None, "comparison": None}
    with atomic_dir(out) as tmp:
        if request.benchmarks and tasks:
            data_dir = find_data_dir(request.data_dir, recipe.eval.data_dir if recipe else None)
            files = prepare_tasks(tasks, data_dir, tmp / "tasks")
            # A line, not a spinner: lm-eval draws its own progress bars (on stderr) under it.
            console.print(f"benchmarks {', '.join(tasks)} on {escape(target.label)} (lm-eval):", highlight=False)
            bench = _run_benchmarks(target, files, limit, request.batch_size, device)
            report["benchmarks"] = bench["tasks"]
            report["harness"] = {"lm_eval_version": bench["lm_eval_version"], "tasks": tasks, "limit": limit,
                                 "data_dir": str(data_dir), "task_files": str(out / "tasks"),
                                 "data_sha256": {t: _sha256(tmp / "tasks" / f"{t}.jsonl") for t in tasks}}  # fmt: skip
        if recipe is not None:
            with console.status("held-out loss and generation"):
                report["held_out"] = held_out_metrics(target, recipe, device)
        if comparison is not None:
            report["comparison"] = {"target": _describe(comparison), "benchmarks": {}, "held_out": None}
            if report["benchmarks"]:
                console.print(f"benchmarks {', '.join(tasks)} on {escape(comparison.label)} (lm-eval):", highlight=False)
                report["comparison"]["benchmarks"] = _run_benchmarks(comparison, files, limit, request.batch_size, device)["tasks"]
            if recipe is not None:
                with console.status(f"held-out loss on {comparison.label}"):
                    report["comparison"]["held_out"] = held_out_metrics(comparison, recipe, device, generate=False)
        base_name = target.base or target.label
        if base_name in GPTJ_6B_NAMES:
            report["published"] = {"source": "GPT-J-6B zero-shot, mesh-transformer-jax README (lm-evaluation-harness)",
                                   "tasks": PUBLISHED_GPTJ_6B}  # fmt: skip
        if (tmp / "tasks").is_dir():  # the task YAMLs point at their data: where it will live after the rename
            for yaml_file in (tmp / "tasks").glob("*.yaml"):
                yaml_file.write_text(yaml_file.read_text().replace(str(tmp / "tasks"), str(out.resolve() / "tasks")))
        report["during_training"] = _benchmarks_during_training(target.run_dir)
        report["plots"] = write_plots(report, target.run_dir, tmp)
        (tmp / "report.json").write_text(json.dumps(_jsonable(report), indent=2))
        (tmp / "report.md").write_text(report_markdown(report))
    if recipe is not None and recipe.logging.trackers:
        _to_trackers(recipe, target.run_dir, out, console)
    return out


def _to_trackers(recipe, run_dir: Path, out: Path, console) -> None:
    """The report (report.md, report.json, its PNGs) to the run's trackers, into the same tracker runs."""
    from ..train.track import Trackers

    try:
        trackers = Trackers(recipe, RunDir(run_dir), skip_through=10**12, warn=warner(console))
    except TrackerError as e:
        raise TrackerError(f"{e} (the report is written: {out})") from None
    trackers.artifacts([out / "report.md", out / "report.json", *sorted(out.glob("*.png"))])
    trackers.finish()


def _run_benchmarks(target: Target, files, limit, batch_size: int, device: str) -> dict:
    """lm-eval on the target, loaded by lm-eval itself; a soft prompt goes in as our SoftPromptModel,
    the model its held-out loss and generation use, with lm-eval's inputs cut to the context the
    prompt leaves (through peft, lm-eval would fill the whole context and the prompt would push its
    last tokens past the model's positions)."""
    soft_prompt = "peft" in target.model_args and is_prompt_tuning_folder(target.model_args["peft"])
    if soft_prompt or "quantized" in target.model_args:  # (a 4-bit base: loaded as it trained, not by lm-eval)
        model, tokenizer = load_target_model(target, device)
        return run_benchmarks_in_memory(model, tokenizer, files, limit, batch_size, device)
    return run_benchmarks(target.model_args, files, limit, batch_size, device)


def _guarded_by(target: Target, recipe) -> list:
    """What an evaluation's report folder must never replace: the run and what it holds, its local
    inputs, or the model folder being evaluated (a report may go inside that one)."""
    if target.run_dir is not None:
        return [*RunDir(target.run_dir).guarded(), *run_inputs(recipe)]
    folders = [Path(target.model_args[key]) for key in ("pretrained", "peft") if key in target.model_args]
    return [(folder, "the model being evaluated", True) for folder in folders if folder.exists()]


def _benchmarks_during_training(run_dir: Path | None) -> list[dict]:
    """The benchmark lines the training loop wrote to metrics.jsonl (eval.benchmark_every)."""
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if not metrics or not metrics.is_file():
        return []
    rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return [{"step": r["step"], "limit": r.get("benchmark_limit"), "benchmarks": r["benchmarks"]} for r in rows if "benchmarks" in r]


def _recipe_of(target: Target):
    if target.run_dir is None:
        return None
    from ..recipe import load_recipe

    return load_recipe(target.run_dir / "recipe.yaml")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "model"


def _describe(target: Target) -> dict:
    return {"label": target.label, "model_args": target.model_args, "fingerprint": _fingerprint(target)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fingerprint(target: Target) -> str | None:
    """sha256 over the weight files of the evaluated folder (adapter or model); None for a hub name."""
    folder = Path(target.model_args.get("peft") or target.model_args["pretrained"])
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, (float, int, type(None))) for v in value):
            return {"value": value[0], "stderr": value[1]}
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
