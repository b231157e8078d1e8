"""The evaluation report as people read it: markdown tables (report.md) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .harness import HEADLINE

# ------------------------------------------------------------------------------------ markdown


# The held-out figures both the terminal's table and report.md show, in order, with report.md's names.
HELD_OUT_FIGURES = [("loss", "loss per target token"), ("perplexity", "perplexity"), ("exact_match", "exact match"), ("rouge_l", "ROUGE-L")]


def format_metric(metric: str, pair) -> str:
    """A benchmark figure as people read it: accuracies in percent, perplexities as numbers
    (with an exponent once they pass a million: an untrained model's LAMBADA perplexity has 20
    digits), each with lm-eval's standard error where it gave one."""
    if not pair:
        return "-"
    value, stderr = (pair["value"], pair["stderr"]) if isinstance(pair, dict) else pair  # report.json's, or in memory
    if metric == "perplexity":
        return format_number(value) + (f" ± {format_number(stderr)}" if stderr is not None else "")
    return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def format_number(value: float, digits: int = 2) -> str:
    """`value` with `digits` decimals and thousands separators, or as 4.315e+21 from a million on."""
    return f"{value:.3e}" if abs(value) >= 1e6 else f"{value:,.{digits}f}"


def _table_cell(text: str, width: int = 120, tail: bool = False) -> str:
    """Text as one cell of a Markdown table: one line, cut to `width` characters (`tail`: its last
    ones, after "…"), then its backslashes and pipes escaped (once: a pipe left bare, or after an
    escaped backslash, would end the cell)."""
    line = text.replace("\n", " ")
    line = "…" + line[-(width - 1) :] if tail and len(line) > width else line[:width]
    return line.replace("\\", "\\\\").replace("|", "\\|")


def report_table(report: dict, title: str):
    """The report's figures as a rich table for the terminal: this target's, and the comparison's
    (the run's base model, or --compare) beside them when there is one."""
    from rich.table import Table

    comparison = report.get("comparison")
    table = Table("task", "metric", title=f"Evaluation of {title}")
    table.add_column(report["target"]["label"] if comparison else "value", overflow="fold")
    if comparison:
        table.add_column(comparison["target"]["label"], overflow="fold")
    for task, metrics in report["benchmarks"].items():
        for metric, pair in metrics.items():
            other = [format_metric(metric, comparison["benchmarks"].get(task, {}).get(metric))] if comparison else []
            table.add_row(task, metric, format_metric(metric, pair), *other)
    held, other_held = report.get("held_out") or {}, (comparison or {}).get("held_out") or {}
    for key, _ in HELD_OUT_FIGURES:
        if held.get(key) is not None:
            other = [format_number(other_held[key], 4) if other_held.get(key) is not None else "-"] if comparison else []
            table.add_row("held-out", key, format_number(held[key], 4), *other)
    return table


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
        for key, label in HELD_OUT_FIGURES:
            if held.get(key) is None:
                continue
            value = lambda v: "-" if v is None else format_number(v, 4)  # noqa: E731
            lines.append(f"| {label} | {value(held.get(key))} |" + (f" {value(other.get(key))} |" if comparison else ""))
        lines.append("")
        if held.get("samples"):
            lines += ["Sample of greedy answers on held-out prompts:", "", "| prompt | reference | output | ok |", "| --- | --- | --- | --- |"]
            for s in held["samples"]:
                prompt = s["instruction"] + (" / " + s["input"] if s["input"] else "")
                # a conversation's prompt ends with the turn being answered: show its end (the tools, the system turn open it)
                cells = [_table_cell(prompt, tail=s.get("conversation", False))] + [_table_cell(c) for c in (s["reference"], s["output"])]
                lines.append("| " + " | ".join(cells) + f" | {'yes' if s['correct'] else 'no'} |")
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
