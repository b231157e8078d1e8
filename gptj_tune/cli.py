"""The `gptj-tune` command line. Thin: parse arguments, load the Recipe, call one function, print.

Library errors (GptjTuneError) become one clear message and an exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from .errors import GptjTuneError, Stopped
from .quiet import quiet_libraries
from .recipe_commands import copy_recipe, list_recipes, resolve_recipe_path as _resolve_recipe_path

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Fine-tune GPT-J (and GPT-Neo) from a YAML recipe.")
recipes_app = typer.Typer(help="List shipped recipes, or copy one out to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(help="Prepare a recipe's data ahead of a run (a token store shared by runs), and look at it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def _friendly(fn):
    """Turn GptjTuneError into a message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .train.signals import signals_stop_the_command
        from .train.workers import describe_failure, report_worker_error

        try:  # Ctrl-C or SIGTERM: one line, and what was being written is removed (`run` says more, inside)
            with signals_stop_the_command(passthrough=(typer.Exit,), where="", after="nothing is left half-written"):
                return fn(*args, **kwargs)
        except GptjTuneError as e:
            message = escape(str(e))  # verbatim: paths, values and hints like ".[eval]" are not rich markup
            text = f"[yellow]{message}[/]" if isinstance(e, Stopped) else f"[bold red]error:[/] {message}"  # a stop says "stopped ..."
            err_console.print(text, highlight=False, markup=True, soft_wrap=True)
            report_worker_error(str(e), e.exit_code)
            raise typer.Exit(e.exit_code)
        except Exception as e:  # a bug or a library failure: keep the traceback, tell the launcher why
            from .train.disk import disk_full_message

            if (full := disk_full_message(e)) is not None:  # a write no command foresaw: one line all the same
                err_console.print(f"[bold red]error:[/] {escape(full)}", highlight=False, soft_wrap=True)
                report_worker_error(full, 2)
                raise typer.Exit(2) from None
            if (known := describe_failure(e)) is not None:  # a collective failed because of another rank
                err_console.print(f"[bold red]error:[/] {escape(known[0])}", highlight=False, soft_wrap=True)
                report_worker_error(known[0], 1, peer_lost=known[1])
                raise typer.Exit(1) from None
            report_worker_error(f"{type(e).__name__}: {e} (traceback in the launcher log)", 1)
            raise

    return wrapper


@app.command()
@_friendly
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue the run: `latest` or a checkpoint name like `step-40`.", show_default=False
    ),
    force: bool = typer.Option(False, "--force", help="Delete an existing run directory and start over."),
):
    """Train a recipe into its run directory (output.dir)."""
    from .recipe import load_recipe
    from .runlock import lock_for_this_process
    from .train.launch import launch, needs_launch
    from .train.workers import register_worker

    from .train.signals import signals_stop_the_command

    with signals_stop_the_command(passthrough=(typer.Exit,)):
        register_worker()  # under our launcher: signals reach this worker through the launching process
        path = _resolve_recipe_path(recipe)
        recipe_obj = load_recipe(path, set_, check_paths=True)
        if force:  # the run directory's own checks (train) know the recipe's inputs, not its file
            from .rundir import guard_output, is_frozen_recipe

            if not is_frozen_recipe(path):  # a run's own frozen recipe is rewritten as it was
                guard_output(recipe_obj.output.dir, "output.dir (which --force deletes)", [(path, "the recipe being run", False)])
        lock = lock_for_this_process(recipe_obj)  # one writer per run directory (runlock.py)
        if lock is not None and (note := lock.acquire()):
            console.print(f"[yellow]note:[/] {escape(note)}")
        try:
            if needs_launch(recipe_obj):  # start the workers, which run this same command
                from .train.track import check_trackers

                check_trackers(recipe_obj)  # once, before any worker starts (each checks again)
                argv = ["run", str(path.resolve()), *(a for o in set_ for a in ("--set", o))]
                argv += (["--resume", resume] if resume else []) + (["--force"] if force else [])
                raise typer.Exit(launch(recipe_obj, argv, console))
            from .train.loop import train  # torch and transformers: only where this process trains

            result = train(recipe_obj, resume=resume or False, force=force, console=console)
        finally:
            if lock is not None:
                lock.release()
    if result is None:  # a worker other than rank 0: rank 0 reports
        return
    table = Table(title=f"Run finished: {result.run_dir}", show_header=False)
    table.add_row("steps", str(result.steps))
    table.add_row("train loss (last step)", f"{result.final_loss:.4f}")
    if result.eval_loss is not None:
        table.add_row("held-out loss", f"{result.eval_loss:.4f}")
    if result.exact_match is not None:
        table.add_row("held-out exact match", f"{result.exact_match:.3f}")
    table.add_row("real tokens", f"{result.tokens:,} ({result.tokens / max(result.seconds, 1e-9):,.0f}/s)")
    table.add_row("padding efficiency", f"{result.tokens / max(result.slots, 1):.3f} (real tokens / token slots computed)")
    table.add_row("wall time (training)", f"{result.seconds:.1f} s")
    table.add_row("final model", str(result.run_dir / "final"))
    console.print(table)


@app.command()
@_friendly
def validate(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
):
    """Check a recipe and print it fully resolved (every default filled in; `> file.yaml` saves it whole); exit 2 if invalid."""
    from .recipe import load_recipe

    recipe_obj = load_recipe(_resolve_recipe_path(recipe), set_, check_paths=True)
    resolved = recipe_obj.to_yaml()
    if console.is_terminal:  # highlighted, long lines wrapped (never cut)
        console.print(Syntax(resolved, "yaml", theme="ansi_dark", background_color="default", word_wrap=True))
    else:  # to a file or a pipe: the YAML whole, as it validates again, and nothing else
        sys.stdout.write(resolved)
        sys.stdout.flush()
    err_console.print("[green]valid[/]")


@app.command("eval")
@_friendly
def eval_(
    target: str = typer.Argument(..., help="A run directory, an exported model folder, or a model name/path."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated: lambada_openai,hellaswag,piqa,winogrande,arc_easy; `none` skips benchmarks."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Items per benchmark (default: all, or the recipe's eval.limit)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Benchmark files (layout of shared/data/benchmarks)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch size for benchmark requests."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Another target for the comparison column (default: the run's base model)."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default: RUN/eval)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Evaluate checkpoints/step-N of a run instead of final/."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
):
    """Benchmarks (lm-eval on local files), held-out loss and instruction following; writes eval/report.*."""
    from .evaluate.render import report_table
    from .evaluate.report import EvalRequest, run_eval

    chosen = None if tasks is None else [] if tasks.strip() == "none" else [t.strip() for t in tasks.split(",") if t.strip()]
    request = EvalRequest(target, chosen, limit, data_dir, batch_size, compare, out, checkpoint, force=force)
    folder = run_eval(request, console)
    report = json.loads((folder / "report.json").read_text())
    console.print(report_table(report, target))
    console.print(f"Report: {folder / 'report.md'}", markup=False)


@app.command()
@_friendly
def export(
    run_dir: str = typer.Argument(..., help="The run directory to export."),
    out: str = typer.Option(..., "--out", help="Folder to write (refused if it exists, unless --force)."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="final, latest, or step-N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 (default: the training dtype)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="LoRA: save the peft adapter instead of merging (a soft prompt always is)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest safetensors shard, e.g. 2GB."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip reloading the export and comparing logits."),
):
    """Write a plain Hugging Face model folder (LoRA merged, shards consolidated) and verify it."""
    from .export import ExportRequest, export_run

    from .stages import stage_display

    request = ExportRequest(run_dir, out, checkpoint, dtype, adapter_only, max_shard_size, force, not no_verify)
    result = export_run(request, stage_display(console))
    if result.adapter_only and not adapter_only:
        console.print("a soft prompt is not a change of weights, so nothing is merged: the export is the peft "
                      "prompt-tuning adapter (PeftModel.from_pretrained on the base model, or gptj-tune generate)")  # fmt: skip
    if result.max_abs_diff is not None:
        console.print(f"verified: reloaded in a fresh process, max |logit diff| {result.max_abs_diff:.3g} "
                      f"(tolerance {result.tolerance:.3g} for {result.dtype})")  # fmt: skip
    console.print(f"Exported to {result.out}", markup=False)


@app.command()
@_friendly
def generate(
    target: str = typer.Argument(..., help="A run directory, an exported folder, or a model name/path."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One instruction (or raw text with --raw)."),
    input_: str = typer.Option("", "--input", help="The instruction's input/context, where the template has one."),
    file: Optional[str] = typer.Option(None, "--file", help="A file of prompts, one per line."),
    chat: bool = typer.Option(False, "--chat", help="Interactive, empty line or Ctrl-D to quit: a model trained on conversations keeps one conversation (its chat template); others answer each line alone."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the prompt template."),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: the conversation's system prompt (as the model was trained with one)."),
    tools: Optional[str] = typer.Option(None, "--tools", help="With --chat: a JSON file of the tools the conversation offers (function schemas, as in the training data); type `/tool RESULT` to answer a call."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0),
    seed: int = typer.Option(0, "--seed"),
):
    """Generate from a run or a model, streaming tokens, with the recipe's prompt template."""
    from .generate import Generator, checked_options
    from .stages import stage_display

    offered = checked_options(prompt, file, chat, system, tools)  # (before a model of minutes is loaded)
    with stage_display(err_console)(f"loaded {target}"):  # (on stderr: stdout holds the answers alone)
        generator = Generator(target, raw=raw, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              system=system, tools=offered)  # fmt: skip
    if prompt is not None:
        generator.stream(prompt, console, input_)
    elif file is not None:
        generator.answer_file(Path(file), console)
    else:
        generator.chat_loop(console)


@app.command()
@_friendly
def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.batch_size=4 (repeatable)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Devices to plan for (default: the recipe's world size)."),
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", min=0.1, help="Memory per device in GiB (default: this "
                                            "machine's GPU, else 80: A100/H100 80GB).", show_default=False),  # fmt: skip
):
    """Estimate per-device memory (model states + activations) for each backend; exit 2 if the recipe will not fit."""
    from rich.table import Column

    from .plan import GIB, local_gpu, plan as make_plan
    from .recipe import load_recipe

    recipe_obj = load_recipe(_resolve_recipe_path(recipe), set_)
    here = local_gpu() if gpu_mem is None else None
    gpu_mem = gpu_mem or (here[1] if here else 80.0)
    planned = make_plan(recipe_obj, gpus, gpu_mem)
    shape, r = planned.shape, recipe_obj
    console.print(
        f"{r.model.name_or_path}: {shape.params / 1e9:.3f} B parameters, {shape.trainable / 1e6:,.1f} M trainable "
        f"({r.method.kind}); micro-batch {r.train.batch_size} x {r.data.max_length} tokens, gradient checkpointing "
        f"{'on' if r.model.gradient_checkpointing else 'off'}; {planned.devices} device(s) of {round(gpu_mem, 1):g} GiB"
        + (f" (this machine's {here[0]}; --gpu-mem to plan for another)" if here else "")
    )
    table = Table(
        *(Column(name, no_wrap=True, justify=j) for name, j in
          [("setup", "left"), ("states", "right"), ("activations", "right"), ("total", "right"), ("fits", "left"), ("", "left")]),
        caption="per device, GiB",
    )  # fmt: skip
    for e in planned.estimates:
        table.add_row(e.setup, f"{e.states / GIB:.2f}", f"{e.activations / GIB:.2f}", f"{e.total / GIB:.2f}",
                      "[green]yes[/]" if planned.fits(e) else "[red]no[/]", "<- recipe" if e.setup == planned.own else "")  # fmt: skip
    console.print(table)
    console.print("[dim]Offload setups also need host memory for what they move off the device.[/]")
    if refusal := planned.refusal():
        err_console.print(f"[bold red]will not fit:[/] {escape(refusal)}", soft_wrap=True)
        raise typer.Exit(2)


@data_app.command("prepare")
@_friendly
def data_prepare(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set data.max_length=1024 (repeatable)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the length histogram PNG (default: in the store)."),
):
    """Tokenize, split and pack the recipe's data into the shared cache (data.cache_dir) and print its statistics."""
    from .data_commands import print_prepared, recipe_data
    from .recipe import load_recipe

    recipe_obj = load_recipe(_resolve_recipe_path(recipe), set_, check_paths=True)
    data, _, seconds = recipe_data(recipe_obj, console)
    png = print_prepared(data, recipe_obj, seconds, console, plot)
    console.print(f"length histogram: {escape(str(png))}" if png else "[dim]no length histogram: pip install 'gptj-tune[eval]' for matplotlib[/]")


@data_app.command("show")
@_friendly
def data_show(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a key (repeatable)."),
    n: int = typer.Option(3, "-n", min=1, help="Rows to show."),
    start: int = typer.Option(0, "--start", min=0, help="First row to show."),
    split: str = typer.Option("train", "--split", help="train, or eval (the held-out rows)."),
):
    """Print packed rows decoded: target tokens highlighted, example boundaries marked (the template and masking, before a GPU is paid for)."""
    from .data_commands import recipe_data, show_rows
    from .recipe import load_recipe

    if split not in ("train", "eval"):
        raise typer.BadParameter(f"expected train or eval, got {split!r}", param_hint="--split")
    recipe_obj = load_recipe(_resolve_recipe_path(recipe), set_, check_paths=True)
    data, tokenizer, _ = recipe_data(recipe_obj, err_console)
    show_rows(data, tokenizer, split, start, n, console)


@app.command("runs")
@_friendly
def runs_(folder: Path = typer.Argument(Path("runs"), help="The folder holding run directories.")):
    """A table of the runs under a folder: status (running, finished, interrupted at step N, failed), method, model, figures."""
    from .runs import print_runs

    print_runs(folder, console)


@app.command()
@_friendly
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    out: Path = typer.Option(Path("compare.png"), "--out", help="Where to write the PNG of the loss curves."),
):
    """Runs side by side: the recipe keys that differ, their figures, and one PNG overlaying the loss curves and held-out points."""
    from .runs import print_comparison

    print_comparison(runs, out, console)


@recipes_app.callback()
def recipes_list(ctx: typer.Context):
    """List shipped recipes with their descriptions."""
    if ctx.invoked_subcommand is None:
        list_recipes(console)


@recipes_app.command("copy")
@_friendly
def recipes_copy(
    name: str = typer.Argument(..., help="Shipped recipe name (see `gptj-tune recipes`)."),
    dest: Path = typer.Argument(..., help="Where to write the copy."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Copy a shipped recipe to edit it (like torchtune's `tune cp`)."""
    copy_recipe(name, dest, force, console)


@recipes_app.command("reference", hidden=True)
def recipes_reference():
    """Print the recipe reference (markdown) that docs/recipe-reference.md embeds."""
    from .recipe import reference_markdown

    sys.stdout.write(reference_markdown())


def normalize_argv(args: list[str]) -> list[str]:
    """A bare `--resume` (last word, or followed by another option) means `--resume latest`."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("latest")
    return out


def main():
    quiet_libraries()
    from .train.workers import in_worker, leave_worker

    if not in_worker():
        app(args=normalize_argv(sys.argv[1:]), prog_name="gptj-tune")
        return
    try:
        app(args=normalize_argv(sys.argv[1:]), prog_name="gptj-tune")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    except BaseException:  # a bug: the traceback, as Python would print it
        traceback.print_exc()
        code = 1
    else:
        code = 0
    leave_worker(code)


if __name__ == "__main__":
    main()
