"""Benchmarks through EleutherAI's lm-evaluation-harness, fed from local files.

The five tasks GPT-J-6B's zero-shot results were published on are shipped as lm-eval task YAMLs
(`gptj_lambada_openai`, `gptj_hellaswag`, `gptj_piqa`, `gptj_winogrande`, `gptj_arc_easy`). The
local files under a data dir (the layout of ../shared/data/benchmarks) are first converted to one
JSONL per task; the YAMLs, written next to them, are ordinary lm-eval task configs, so the stock
`lm_eval --include_path DIR` command gives the same numbers as `gptj-tune eval`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from ..errors import GptjTuneError, first_line
from ..recipe import BENCHMARK_TASKS as TASKS

# The metric each task is known by (reports, plots, benchmarks during training).
HEADLINE = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc"}
DATA_DIR_ENV = "GPTJ_TUNE_BENCHMARK_DATA"
NO_POOL_ENV = "DISABLE_MULTIPROC"  # lm-eval bootstraps stderrs in this process when set

# Where each task's files sit under the data dir, and what a user must put there.
SOURCES = {
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "arc_easy": ("arc_easy/arc_easy_llmfoundry.jsonl",),
}

# Published GPT-J-6B zero-shot numbers (mesh-transformer-jax README, from lm-evaluation-harness).
PUBLISHED_GPTJ_6B = {
    "lambada_openai": {"perplexity": 3.99, "acc": 0.697},
    "winogrande": {"acc": 0.653},
    "hellaswag": {"acc": 0.661},
    "piqa": {"acc": 0.765},
}

_MULTIPLE_CHOICE = """\
task: gptj_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_LAMBADA = """\
task: gptj_lambada_openai
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' ' + text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# WinoGrande is scored by partial evaluation: the context is the sentence up to the blank with
# each option filled in, the continuation (the rest) is the same for both, as in the harness.
_WINOGRANDE = """\
task: gptj_winogrande
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: label
doc_to_target: "{{{{suffix}}}}"
doc_to_choice: "{{{{prefixes}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass(frozen=True)
class TaskFiles:
    folder: Path  # holds <task>.jsonl and gptj_<task>.yaml for every prepared task
    tasks: tuple[str, ...]


def find_data_dir(explicit: str | None, recipe_dir: str | None) -> Path:
    """--data-dir, else the recipe's eval.data_dir, else $GPTJ_TUNE_BENCHMARK_DATA."""
    import os

    chosen = explicit or recipe_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise GptjTuneError(
            f"benchmarks need their data files: pass --data-dir DIR, set eval.data_dir in the recipe, or "
            f"set {DATA_DIR_ENV}; or --tasks none for the held-out reports alone. DIR holds "
            + ", ".join(f for files in SOURCES.values() for f in files)
        )
    path = Path(chosen)
    if not path.is_dir():
        raise GptjTuneError(f"benchmark data dir {path} does not exist")
    return path


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise GptjTuneError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")


def prepare_tasks(tasks: list[str], data_dir: Path, out: Path) -> TaskFiles:
    """Convert each task's local files to JSONL under `out` and write its lm-eval YAML there."""
    check_tasks(tasks)
    for task in tasks:
        missing = [f for f in SOURCES[task] if not (data_dir / f).is_file()]
        if missing:
            raise GptjTuneError(f"{task}: missing {', '.join(str(data_dir / f) for f in missing)}; put the "
                                f"benchmark's files there (layout: {', '.join(SOURCES[task])})")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        docs = _CONVERTERS[task](data_dir)
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"gptj_{task}.yaml").write_text(_task_yaml(task, data))
    return TaskFiles(out, tuple(tasks))


def _task_yaml(task: str, data: Path) -> str:
    if task == "lambada_openai":
        return _LAMBADA.format(data=data)
    if task == "winogrande":
        return _WINOGRANDE.format(data=data)
    text = {"hellaswag": "{{query}}", "piqa": "Question: {{goal}}\\nAnswer:", "arc_easy": "{{query}}\\nAnswer:"}[task]
    return _MULTIPLE_CHOICE.format(name=task, data=data, text=text)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _jsonl(path: Path) -> list[dict]:
    out = []
    for number, line in enumerate(_lines(path), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GptjTuneError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return out


def _lambada(d: Path) -> list[dict]:
    return [{"text": r["text"]} for r in _jsonl(d / SOURCES["lambada_openai"][0])]


def _hellaswag(d: Path) -> list[dict]:
    """Six lines per item: the preprocessed context, the gold index, four preprocessed endings."""
    path = d / SOURCES["hellaswag"][0]
    lines = _lines(path)
    if len(lines) % 6:
        raise GptjTuneError(f"{path}: expected 6 lines per item, got {len(lines)} lines")
    return [
        {"query": lines[i], "label": int(lines[i + 1]), "choices": [" " + e for e in lines[i + 2 : i + 6]]}
        for i in range(0, len(lines), 6)
    ]


def _with_labels(docs: list[dict], labels_path: Path) -> list[dict]:
    labels = [line.strip() for line in _lines(labels_path) if line.strip()]
    if len(labels) != len(docs):
        raise GptjTuneError(f"{labels_path}: {len(labels)} labels for {len(docs)} items")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels)]


def _piqa(d: Path) -> list[dict]:
    docs = _with_labels(_jsonl(d / SOURCES["piqa"][0]), d / SOURCES["piqa"][1])
    return [{"goal": r["goal"], "choices": [" " + r["sol1"], " " + r["sol2"]], "label": r["label"]} for r in docs]


def _winogrande(d: Path) -> list[dict]:
    docs = _with_labels(_jsonl(d / SOURCES["winogrande"][0]), d / SOURCES["winogrande"][1])
    out = []
    for r in docs:
        before, after = r["sentence"].split("_", 1)
        out.append({
            "prefixes": [before + r["option1"], before + r["option2"]],
            "suffix": " " + after.strip(),
            "label": r["label"] - 1,  # labels are 1/2
        })  # fmt: skip
    return out


def _arc_easy(d: Path) -> list[dict]:
    return [{"query": r["query"], "choices": [" " + c for c in r["choices"]], "label": r["gold"]}
            for r in _jsonl(d / SOURCES["arc_easy"][0])]  # fmt: skip


_CONVERTERS = {"lambada_openai": _lambada, "hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande, "arc_easy": _arc_easy}


def run_benchmarks(model_args: dict, files: TaskFiles, limit: int | None, batch_size: int, device: str) -> dict:
    """Run the prepared tasks with lm-eval's own HF model class; returns {task: {metric: (value, stderr)}}."""
    return _evaluate("hf", {**model_args, "device": device, "dtype": "float32"}, files, limit, batch_size)


def run_benchmarks_in_memory(model, tokenizer, files: TaskFiles, limit: int | None, batch_size: int, device) -> dict:
    """The same, on a model being trained (plain or peft), on this process alone."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """lm-eval's progress bars off: they would print into the run's progress display, which
        says what is happening (`step N: benchmarks ...`)."""

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

    from ..model.load import model_context
    from ..model.prompt_tuning import prompt_slots_of

    # A soft prompt takes the first positions of the context: lm-eval cuts inputs to what is left.
    slots = prompt_slots_of(model)
    context = model_context(model.config)
    max_length = context - slots if slots and context else None
    was_training = model.training
    model.eval()
    try:
        lm = QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), max_length=max_length)
        return _evaluate(lm, None, files, limit, batch_size, quiet=True)
    finally:
        model.train(was_training)


def _evaluate(model, model_args, files: TaskFiles, limit, batch_size, quiet: bool = False) -> dict:
    try:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":
            raise GptjTuneError(f"lm-eval is installed but does not import: {e}") from None
        raise GptjTuneError('benchmarks need lm-eval, in the "eval" extra: pip install "gptj-tune[eval]" (pip install -e ".[eval]" in a checkout)') from None
    except ImportError as e:  # installed, but broken against another package (a pyarrow built for another NumPy, say)
        raise GptjTuneError(f"lm-eval is installed but does not import: {e}") from None
    # lm-eval records the git commit of the current directory (`git describe` in a subprocess, which
    # prints "fatal: not a git repository" outside one); the reports do not use it.
    no_git = (
        mock.patch.object(evaluator, "get_git_commit_hash", return_value=None)
        if hasattr(evaluator, "get_git_commit_hash")
        else contextlib.nullcontext()
    )
    # Its per-document bar while it builds the requests, off with the model's own where quiet.
    from lm_eval.api import task as task_module

    no_bars = (
        mock.patch.object(task_module, "tqdm", lambda items, *a, **k: items)
        if quiet and hasattr(task_module, "tqdm")
        else contextlib.nullcontext()
    )
    # lm-eval bootstraps the stderr of perplexity (lambada) in a multiprocessing pool of one forked
    # process per CPU, unless DISABLE_MULTIPROC is set. Forking this process, which runs threads
    # (torch's, the progress display's, a training run's), can leave a worker waiting forever on a
    # lock another thread held at the fork, and the pool then waits for it: an evaluation that hung
    # for good in CI. The single-process loop draws the same resamples (chunk i seeded with i).
    one_process = mock.patch.dict(os.environ, {NO_POOL_ENV: "1"})
    try:
        with no_git, no_bars, one_process, _no_datasets_bars():
            results = evaluator.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=[f"gptj_{t}" for t in files.tasks],
                limit=limit,
                batch_size=batch_size,
                task_manager=TaskManager(include_path=str(files.folder), include_defaults=False),
                log_samples=False,
                bootstrap_iters=1000,
            )
    except OSError as e:  # a model or tokenizer that is not there (offline hub name, empty folder)
        name = (model_args or {}).get("pretrained", "the model")
        raise GptjTuneError(f"cannot load {name} for the benchmarks ({first_line(e)})") from None
    return _collect(results, files)


@contextlib.contextmanager
def _no_datasets_bars():
    """datasets' `Generating test split` bar for each task file lm-eval loads (files of ours, read
    in a second): nothing a user can act on. Put back as it was afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def _collect(results: dict, files: TaskFiles) -> dict:
    out = {}
    for task in files.tasks:
        raw = results["results"][f"gptj_{task}"]
        metrics = {}
        for key, value in raw.items():
            if "," not in key or "stderr" in key:
                continue
            name = key.split(",")[0]
            stderr = raw.get(f"{name}_stderr,none")
            metrics[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
        out[task] = metrics
    return {"tasks": out, "lm_eval_version": _lm_eval_version()}


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
