"""`gptj-tune eval`: benchmarks (lm-eval, local files), held-out loss and instruction following for a
target and its comparison, written as eval/report.json, eval/report.md and PNG plots."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .errors import GptjTuneError
from .evaluate import Target, exact_match, resolve_target, rouge_l
from .harness import PUBLISHED_GPTJ_6B, check_tasks, find_data_dir, prepare_tasks, run_benchmarks, run_benchmarks_in_memory
from .methods import SoftPromptModel, is_prompt_tuning_folder, prompt_slots_of
from .rundir import RunDir, atomic_dir, guard_output, run_inputs

HEADLINE = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc"}
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

    from .errors import RunDirError

    target = resolve_target(request.target, request.checkpoint)
    recipe = _recipe_of(target)
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
    return out


def _run_benchmarks(target: Target, files, limit, batch_size: int, device: str) -> dict:
    """lm-eval on the target, loaded by lm-eval itself; a soft prompt goes in as our SoftPromptModel,
    the model its held-out loss and generation use, with lm-eval's inputs cut to the context the
    prompt leaves (through peft, lm-eval would fill the whole context and the prompt would push its
    last tokens past the model's positions)."""
    if "peft" in target.model_args and is_prompt_tuning_folder(target.model_args["peft"]):
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
    from .recipe import load_recipe

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


def load_target_model(target: Target, device: str):
    """The target as a model (base + peft adapter for a LoRA run, behind its soft prompt for a
    prompt-tuning run) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = target.model_args
    model = AutoModelForCausalLM.from_pretrained(args["pretrained"])
    if "peft" in args and is_prompt_tuning_folder(args["peft"]):
        model = SoftPromptModel.from_saved(model, args["peft"])
    elif "peft" in args:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args["peft"])
    tokenizer = AutoTokenizer.from_pretrained(args.get("tokenizer", args["pretrained"]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def held_out_metrics(target: Target, recipe, device: str, generate: bool = True) -> dict:
    """Loss and perplexity on the recipe's held-out split, masked and packed exactly as in training;
    then greedy generation on held-out prompts: exact match and ROUGE-L, with a sample."""
    from accelerate import Accelerator

    from .data import prepare_data
    from .data.tokenize import Batches
    from .step import evaluate_loss

    model, tokenizer = load_target_model(target, device)
    data = prepare_data(recipe.data, tokenizer, prompt_slots_of(model))  # a base model compared: no prompt slots
    batches = Batches(data.eval_rows, recipe.eval.batch_size or recipe.train.batch_size, tokenizer.pad_token_id, 0, shuffle=False)
    loss = evaluate_loss(model, batches, Accelerator(cpu=device == "cpu"))
    held_out_sha = hashlib.sha256(json.dumps(data.eval_records, sort_keys=True).encode()).hexdigest()[:16]
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50)) if loss is not None else None,
              "examples": data.eval_stats.examples, "target_tokens": data.eval_stats.target_tokens,
              "data_sha256": held_out_sha}  # fmt: skip
    records = data.eval_records[: recipe.eval.generate_samples or 100]
    if generate and records:
        scored = exact_match(model, tokenizer, data.template, records, recipe.eval.max_new_tokens)
        scores = [rouge_l(s["reference"], s["output"]) for s in scored.samples]
        result.update({"exact_match": scored.accuracy, "rouge_l": sum(scores) / len(scores), "generated": len(records),
                       "samples": scored.samples[:10]})  # fmt: skip
    return result


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


# ------------------------------------------------------------------------------------ markdown


def format_metric(metric: str, pair) -> str:
    """A benchmark figure as people read it: accuracies in percent, perplexities as numbers
    (with an exponent once they pass a million: an untrained model's LAMBADA perplexity has 20
    digits), each with lm-eval's standard error where it gave one."""
    if not pair:
        return "-"
    value, stderr = pair
    if metric == "perplexity":
        return format_number(value) + (f" ± {format_number(stderr)}" if stderr is not None else "")
    return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def format_number(value: float, digits: int = 2) -> str:
    """`value` with `digits` decimals and thousands separators, or as 4.315e+21 from a million on."""
    return f"{value:.3e}" if abs(value) >= 1e6 else f"{value:,.{digits}f}"


def report_markdown(report: dict) -> str:
    target = report["target"]["label"]
    comparison = report.get("comparison")
    published = report.get("published", {}).get("tasks", {})
    lines = [f"# Evaluation of `{target}`", ""]
    if report["benchmarks"]:
        h = report["harness"]
        lines += [f"Benchmarks: lm-evaluation-harness {h['lm_eval_version']}, zero-shot, local files from `{h['data_dir']}`"
                  + (f", first {h['limit']} items per task" if h["limit"] else ", all items") + ".", ""]  # fmt: skip
        header = ["task", "metric", target]
        if comparison:
            header.append(comparison["target"]["label"])
        if published:
            header.append("GPT-J-6B (published)")
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for task, metrics in report["benchmarks"].items():
            for metric, pair in metrics.items():
                row = [task, metric, format_metric(metric, pair)]
                if comparison:
                    row.append(format_metric(metric, comparison["benchmarks"].get(task, {}).get(metric)))
                if published:
                    value = published.get(task, {}).get(metric)
                    row.append("-" if value is None else (f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.1f}%"))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    held = report.get("held_out")
    if held:
        lines += ["## Held-out data of the recipe", "", "| measure | " + target + (f" | {comparison['target']['label']}" if comparison else "") + " |",
                  "| --- | --- |" + (" --- |" if comparison else "")]  # fmt: skip
        other = (comparison or {}).get("held_out") or {}
        for key, label in [("loss", "loss per target token"), ("perplexity", "perplexity"), ("exact_match", "exact match"), ("rouge_l", "ROUGE-L")]:
            if held.get(key) is None:
                continue
            value = lambda v: "-" if v is None else format_number(v, 4)  # noqa: E731
            lines.append(f"| {label} | {value(held.get(key))} |" + (f" {value(other.get(key))} |" if comparison else ""))
        lines.append("")
        if held.get("samples"):
            lines += ["Sample of greedy answers on held-out prompts:", "", "| prompt | reference | output | ok |", "| --- | --- | --- | --- |"]
            for s in held["samples"]:
                prompt = (s["instruction"] + (" / " + s["input"] if s["input"] else "")).replace("|", "\\|").replace("\n", " ")
                cells = [prompt, s["reference"], s["output"]]
                lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells) + f" | {'yes' if s['correct'] else 'no'} |")
            lines.append("")
    during = report.get("during_training") or []
    if during:
        tasks = list(during[0]["benchmarks"])
        lines += ["## Benchmarks during training", "", f"Headline metric per task, first {during[0]['limit'] or 'all'} items.", "",
                  "| step | " + " | ".join(f"{t} ({HEADLINE[t]})" for t in tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]  # fmt: skip
        for row in during:
            lines.append(f"| {row['step']} | " + " | ".join(f"{100 * row['benchmarks'][t].get(HEADLINE[t], float('nan')):.1f}%" for t in tasks) + " |")
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    if report.get("published"):
        lines += [f"Published numbers: {report['published']['source']}; small implementation differences move them.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed), or None where matplotlib is not
    installed (it comes with the `eval` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(report: dict, run_dir: Path | None, out: Path) -> list[str]:
    """PNG plots: loss curves from the run's metrics.jsonl, and benchmarks vs the comparison."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if metrics and metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out loss")
        ax.set_xlabel("step")
        written.append(_save_plot(plt, fig, ax, out / "loss.png", "loss per target token", "Training", legend_size=None))
    during = report.get("during_training") or []
    if during:
        fig, ax = plt.subplots(figsize=(7, 4))
        for task in during[0]["benchmarks"]:
            points = [(r["step"], 100 * r["benchmarks"][task][HEADLINE[task]]) for r in during if HEADLINE[task] in r["benchmarks"].get(task, {})]
            if points:
                ax.plot(*zip(*points), "o-", label=f"{task} ({HEADLINE[task]})")
        ax.set_xlabel("step")
        written.append(_save_plot(plt, fig, ax, out / "benchmarks_during_training.png", "%", "Benchmarks during training"))
    if report["benchmarks"]:
        tasks = list(report["benchmarks"])
        series = [(report["target"]["label"], report["benchmarks"])]
        if report.get("comparison") and report["comparison"]["benchmarks"]:
            series.append((report["comparison"]["target"]["label"], report["comparison"]["benchmarks"]))
        published = report.get("published", {}).get("tasks")
        if published:
            series.append(("GPT-J-6B (published)", {t: {m: (v, None) for m, v in ms.items()} for t, ms in published.items()}))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(series)
        for i, (label, results) in enumerate(series):
            values = [100 * (results.get(t, {}).get(HEADLINE[t]) or (0.0, None))[0] for t in tasks]
            ax.bar([k + i * width for k in range(len(tasks))], values, width, label=label[:40])
        ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(tasks))])
        ax.set_xticklabels([f"{t}\n({HEADLINE[t]})" for t in tasks], fontsize=8)
        written.append(_save_plot(plt, fig, ax, out / "benchmarks.png", "%", "Benchmarks (zero-shot)"))
    return written


def _save_plot(plt, fig, ax, path: Path, ylabel: str, title: str, legend_size: int | None = 8) -> str:
    """Label, lay out, write and close one figure; returns the file name."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**({"fontsize": legend_size} if legend_size else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
