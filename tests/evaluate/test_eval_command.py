"""`gptj-tune eval`: lm-eval benchmarks on the local files, held-out metrics, reports, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import cli, file_contents, small_recipe

try:
    import lm_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise  # CI installs the eval extra: a missing lm-eval there is a failure, not a skip
    pytest.skip("the eval extra (lm-eval) is not installed: pip install -e '.[dev,eval]'", allow_module_level=True)

ALL = "lambada_openai,hellaswag,piqa,winogrande,arc_easy"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    result = cli("run", str(small_recipe(tmp, steps=20, save_every=20)))
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "run"


def _report(folder):
    return json.loads((folder / "report.json").read_text())


@pytest.mark.slow
def test_every_task_runs_on_local_files_and_the_report_is_complete(lora_run, shared_data, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside a git repository: lm-eval's `git describe` must not print there
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append("fork") or real_fork())
    result = cli("eval", str(lora_run), "--tasks", ALL, "--limit", "6", "--data-dir", str(shared_data / "benchmarks"))
    assert result.returncode == 0, result.stderr[-3000:]
    # lm-eval's bootstrap of perplexity's stderr forks a pool unless told not to; a fork of this
    # threaded process once hung CI for good. It is done here, in this process.
    assert not forks
    assert _report(lora_run / "eval")["benchmarks"]["lambada_openai"]["perplexity"]["stderr"] > 0
    printed = capfd.readouterr().err + result.stderr
    assert "not a git repository" not in printed and "Generating test split" not in printed  # datasets' bar per task file
    # Each benchmark pass is announced on a line of its own (lm-eval draws its bars below it).
    assert result.stdout.count(f"benchmarks {ALL.replace(',', ', ')} on ") == 2, result.stdout[-2000:]
    report = _report(lora_run / "eval")
    assert list(report["benchmarks"]) == ALL.split(",")
    assert set(report["benchmarks"]["lambada_openai"]) == {"perplexity", "acc"}
    assert set(report["benchmarks"]["hellaswag"]) == {"acc", "acc_norm"}
    assert report["harness"]["limit"] == 6 and report["harness"]["lm_eval_version"]
    assert set(report["harness"]["data_sha256"]) == set(ALL.split(","))
    # The comparison column is the run's base model, evaluated on the same items.
    assert report["comparison"]["target"]["model_args"]["pretrained"].endswith("base-model")
    assert set(report["comparison"]["benchmarks"]) == set(report["benchmarks"])
    held = report["held_out"]
    assert held["loss"] < report["comparison"]["held_out"]["loss"] - 0.5  # the run learned its data
    assert 0 <= held["exact_match"] <= 1 and 0 <= held["rouge_l"] <= 1 and held["samples"]
    # Same held-out loss as the training run measured at its end.
    summary = json.loads((lora_run / "summary.json").read_text())
    assert held["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # The terminal's table has the base model's figures beside the run's, as the report has.
    row = next(line for line in result.stdout.splitlines() if "held-out" in line and " loss " in line)
    assert f"{held['loss']:.4f}" in row and f"{report['comparison']['held_out']['loss']:.4f}" in row, result.stdout[-3000:]
    assert "base model" in result.stdout
    md = (lora_run / "eval" / "report.md").read_text()
    assert "| piqa | acc |" in md and "![loss.png](loss.png)" in md and "![benchmarks.png](benchmarks.png)" in md
    for png in ("loss.png", "benchmarks.png"):
        assert (lora_run / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    # The task files stay usable after the report folder was renamed into place.
    for task_yaml in (lora_run / "eval" / "tasks").glob("*.yaml"):
        data_line = next(line for line in task_yaml.read_text().splitlines() if line.strip().startswith("test:"))
        assert (lora_run / "eval" / "tasks" / data_line.split("/")[-1]).exists() and str(lora_run / "eval") in data_line
    # An existing report is never replaced silently.
    again = cli("eval", str(lora_run), "--tasks", "piqa", "--limit", "2", "--data-dir", str(shared_data / "benchmarks"))
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.slow
def test_multiple_choice_scores_follow_the_model(tmp_path, lora_run):
    """A model pushed to prefer one token scores 100% where that token is the answer and 0% where it
    is not: the metric reads the model, it is not a constant."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_run / "base-model")
    model = AutoModelForCausalLM.from_pretrained(lora_run / "base-model")
    token = tok(" lamp", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.lm_head.bias[token] += 40.0
    model.save_pretrained(tmp_path / "biased")
    tok.save_pretrained(tmp_path / "biased")
    for name, correct in (("right", 0), ("wrong", 1)):
        data = tmp_path / name / "piqa"
        data.mkdir(parents=True)
        items = [{"goal": f"Question {i}", "sol1": "lamp lamp lamp", "sol2": "the tree sings"} for i in range(8)]
        (data / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        (data / "valid-labels.lst").write_text(f"{correct}\n" * 8)
        result = cli("eval", str(tmp_path / "biased"), "--tasks", "piqa", "--data-dir", str(tmp_path / name),
                     "--out", str(tmp_path / f"report-{name}"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    assert _report(tmp_path / "report-right")["benchmarks"]["piqa"]["acc"]["value"] == 1.0
    assert _report(tmp_path / "report-wrong")["benchmarks"]["piqa"]["acc"]["value"] == 0.0


@pytest.mark.slow
def test_numbers_equal_the_stock_lm_eval_cli_and_the_merged_model(tmp_path, lora_run, shared_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base-model")
    PeftModel.from_pretrained(base, lora_run / "final").merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(lora_run / "final").save_pretrained(merged)

    tasks = "lambada_openai,piqa,winogrande"
    data = str(shared_data / "benchmarks")
    ours = cli("eval", str(lora_run), "--tasks", tasks, "--limit", "5", "--data-dir", data, "--out", str(tmp_path / "lora"))
    assert ours.returncode == 0, ours.stderr[-2000:]
    folded = cli("eval", str(merged), "--tasks", tasks, "--limit", "5", "--data-dir", data, "--out", str(tmp_path / "merged-eval"))
    assert folded.returncode == 0, folded.stderr[-2000:]
    stock = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={merged},dtype=float32",
         "--include_path", str(tmp_path / "merged-eval" / "tasks"), "--tasks", "gptj_lambada_openai,gptj_piqa,gptj_winogrande",
         "--limit", "5", "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "stock")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "DISABLE_MULTIPROC": "1"},  # as ours: no pool
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    stock_results = json.loads(next((tmp_path / "stock").rglob("results_*.json")).read_text())["results"]
    # An adapter folder on its own (here a copy of final/, as --adapter-only exports one) is evaluated
    # on the base model its adapter_config.json names.
    shutil.copytree(lora_run / "final", tmp_path / "adapter")
    alone = cli("eval", str(tmp_path / "adapter"), "--tasks", tasks, "--limit", "5", "--data-dir", data, "--out", str(tmp_path / "adapter-eval"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    a, b = _report(tmp_path / "lora")["benchmarks"], _report(tmp_path / "merged-eval")["benchmarks"]
    assert _report(tmp_path / "adapter-eval")["benchmarks"] == a
    for task, metrics in b.items():
        for metric, pair in metrics.items():
            assert pair["value"] == stock_results[f"gptj_{task}"][f"{metric},none"], (task, metric)  # identical
            assert a[task][metric]["value"] == pytest.approx(pair["value"], rel=1e-4), (task, metric)  # adapter == merged


@pytest.mark.slow
def test_a_runs_final_folder_is_the_run_and_nothing_to_evaluate_is_said(tmp_path, lora_run):
    run = cli("eval", str(lora_run), "--tasks", "none", "--out", str(tmp_path / "run"))
    final = cli("eval", str(lora_run / "final"), "--tasks", "none", "--out", str(tmp_path / "final"))
    assert run.returncode == 0 and final.returncode == 0, run.stderr[-2000:] + final.stderr[-2000:]
    held_out = _report(tmp_path / "final")["held_out"]
    assert held_out["loss"] is not None and held_out == _report(tmp_path / "run")["held_out"]
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_run / "final" / name, tmp_path / "adapter" / name)
    nothing = cli("eval", str(tmp_path / "adapter"), "--tasks", "none")
    assert nothing.returncode == 2 and "nothing to evaluate: no benchmark tasks (--tasks none)" in nothing.stderr
    assert "is not a run directory, so it has no held-out split" in nothing.stderr
    for out in (tmp_path / "adapter", lora_run / "base-model"):  # neither the adapter nor the base it names
        replaced = cli("eval", str(tmp_path / "adapter"), "--tasks", "piqa", "--out", str(out), "--force")
        assert replaced.returncode == 2 and "that is the model being evaluated" in replaced.stderr, replaced.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (lora_run / "base-model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "piqa", "--data-dir", "/nonexistent/benchmarks"], "benchmark data dir /nonexistent/benchmarks does not exist"),
        (["--tasks", "mmlu", "--data-dir", "."], "unknown task(s) mmlu; available: lambada_openai"),
        (["--tasks", "piqa,mmlu"], "unknown task(s) mmlu; available: lambada_openai"),  # before the missing data dir
        (["--tasks", "piqa"], "pass --data-dir DIR, set eval.data_dir in the recipe, or set GPTJ_TUNE_BENCHMARK_DATA; or --tasks none"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, lora_run, args, message, monkeypatch):
    monkeypatch.delenv("GPTJ_TUNE_BENCHMARK_DATA", raising=False)
    result = cli("eval", str(lora_run), *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_an_empty_model_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("eval", str(tmp_path / "empty"), "--tasks", "none")
    assert result.returncode == 2 and "neither a run directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("out, message", [
    ("{run}/checkpoints", "that is the run's checkpoints"),
    ("{run}/final/eval", "that is inside the run's final model"),
    ("{run}", "that is the run directory"),
    ("{run}/metrics.jsonl", "metrics.jsonl is a file"),
])  # fmt: skip
def test_a_report_never_replaces_the_run_or_writes_into_its_models(lora_run, out, message):
    before = file_contents(lora_run)
    result = cli("eval", str(lora_run), "--tasks", "none", "--out", out.format(run=lora_run), "--force")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert file_contents(lora_run) == before


@pytest.mark.parametrize("target, message", [
    ("./runs/no-such-run", "./runs/no-such-run: no such run directory or model folder"),
    ("no-such-model-name", "no-such-model-name is not a run directory or model folder here, and does not load as a Hugging Face model name"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_target_that_is_neither_a_folder_nor_a_model_name_is_named_first(tmp_path, monkeypatch, target, message, command):
    # Said before anything else: not the missing benchmark data, not the hub client's own message.
    monkeypatch.delenv("GPTJ_TUNE_BENCHMARK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    extra = ["--prompt", "hi"] if command == "generate" else []
    result = cli(command, target, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr and "benchmark data" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_benchmarks_during_training_match_the_final_evaluation(tmp_path, shared_data, capfd):
    data = str(shared_data / "benchmarks")
    recipe = small_recipe(tmp_path, steps=10, save_every=10)
    result = cli("run", str(recipe), "--set", "eval.benchmark_every=5", "--set", f"eval.data_dir={data}",
                 "--set", "eval.limit=6", "--set", "eval.tasks=[piqa,winogrande]")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # lm-eval's own progress bars stay out of the run's progress display; its result line is there.
    printed = result.stdout + result.stderr + "".join(capfd.readouterr())
    # lm-eval's: "Running loglikelihood requests: ..%|" and an unlabelled "..%|" while it builds the
    # requests. (transformers' labelled "Loading weights"/"Writing model shards" bars may show.)
    bars = [x for x in printed.replace("\r", "\n").splitlines() if re.match(r"\s*\d+%\|", x) or "Running loglikelihood" in x]
    assert not bars, bars[:3]
    assert "step 5: piqa acc" in printed
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    during = [x for x in lines if "benchmarks" in x]
    assert [x["step"] for x in during] == [5, 10] and set(during[0]["benchmarks"]) == {"piqa", "winogrande"}
    # The eval command picks tasks, limit and data dir up from the run's recipe.
    evaluated = cli("eval", str(tmp_path / "run"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = _report(tmp_path / "run" / "eval")
    assert report["harness"]["limit"] == 6 and list(report["benchmarks"]) == ["piqa", "winogrande"]
    for task, metrics in report["benchmarks"].items():  # in-memory at step 10 == final/ reloaded from disk
        for metric, pair in metrics.items():
            assert during[-1]["benchmarks"][task][metric] == pytest.approx(pair["value"], abs=1e-9), (task, metric)
    assert [x["step"] for x in report["during_training"]] == [5, 10]
    assert "benchmarks_during_training.png" in report["plots"]


def test_benchmarks_during_training_need_a_data_dir_and_whole_weights(tmp_path):
    from gptj_tune.errors import RecipeError
    from gptj_tune.recipe import load_recipe

    recipe = small_recipe(tmp_path)
    with pytest.raises(RecipeError, match="eval.benchmark_every needs eval.data_dir"):
        load_recipe(recipe, ["eval.benchmark_every=5"])
    with pytest.raises(RecipeError, match="ZeRO-3/FSDP do not give"):
        load_recipe(recipe, ["eval.benchmark_every=5", "eval.data_dir=.", "distributed.backend=fsdp", "distributed.num_processes=2"])


@pytest.mark.slow
def test_a_checkpoint_can_be_evaluated_and_data_is_fingerprinted(tmp_path, lora_run):
    result = cli("eval", str(lora_run), "--checkpoint", "step-20", "--tasks", "none", "--out", str(tmp_path / "ck"))
    assert result.returncode == 0, result.stderr[-2000:]
    held = _report(tmp_path / "ck")["held_out"]
    summary = json.loads((lora_run / "summary.json").read_text())
    assert held["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)  # step-20 is the last step
    assert len(held["data_sha256"]) == 16
    missing = cli("eval", str(lora_run), "--checkpoint", "step-99", "--tasks", "none", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "no checkpoint 'step-99'; available: step-20" in missing.stderr


def test_benchmark_figures_read_as_percentages_and_perplexities_stay_short():
    from gptj_tune.evaluate.render import format_metric, format_number

    assert format_metric("acc", (0.2, 0.0918)) == "20.0% ± 9.2"
    assert format_metric("acc_norm", (0.655, None)) == "65.5%"
    assert format_metric("perplexity", (3.99, 0.12)) == "3.99 ± 0.12"
    assert format_metric("perplexity", (12345.678, None)) == "12,345.68"
    # an untrained model's LAMBADA perplexity (20 digits) keeps the table narrow
    assert format_metric("perplexity", (4.315e21, 5.389e23)) == "4.315e+21 ± 5.389e+23"
    assert format_metric("acc", None) == "-"
    assert format_number(0.17823, 4) == "0.1782" and format_number(2.5e6) == "2.500e+06"


def test_a_missing_or_broken_lm_eval_is_a_one_line_error_that_says_which(monkeypatch):
    import builtins

    from gptj_tune.errors import GptjTuneError
    from gptj_tune.evaluate.harness import _evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(GptjTuneError, match=r'benchmarks need lm-eval, in the "eval" extra: pip install "gptj-tune\[eval\]"'):
        _evaluate(None, None, None, None, None)
    monkeypatch.delitem(sys.modules, "lm_eval")
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):  # installed, but a dependency was built for another NumPy
        if name.startswith("lm_eval"):
            raise ImportError("pyarrow requires NumPy 2.0 or newer, found 1.26.0")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(GptjTuneError, match="lm-eval is installed but does not import: pyarrow requires NumPy 2.0"):
        _evaluate(None, None, None, None, None)
