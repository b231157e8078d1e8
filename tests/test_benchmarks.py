"""The training-throughput harness runs every engine on the same work and writes valid JSON.
(It measures speed; this only checks that it runs and that the engines really did the same work.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def run_benchmark(script: str, shared_data, out, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python benchmarks/<script>.py ... --data-dir <shared data> --out <out>`, as a user runs it."""
    import os

    cmd = [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args, "--data-dir", str(shared_data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}  # this checkout's gptj_tune, whichever one pip installed
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_train_throughput_harness_runs_every_engine_on_the_same_tokens(tmp_path, shared_data):
    out = tmp_path / "tt.json"
    result = run_benchmark("train_throughput", shared_data, out, "--records", "16", "--max-length", "128", "--mixed-precision", "bf16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train throughput: tiny GPT-J, lora" in result.stdout and "hf-trainer" in result.stdout.replace("\n", "")
    report = json.loads(out.read_text())
    assert report["settings"]["mixed_precision"] == "bf16" and "bf16 autocast" in result.stdout.replace("\n", "")
    engines = report["engines"]
    assert set(engines) == {"gptj-tune", "trl-default", "trl-best", "hf-trainer"}
    # The same work: every engine saw exactly the same real tokens, and trained the same adapter size.
    assert len({e["real_tokens"] for e in engines.values()}) == 1
    assert len({e["trainable_params"] for e in engines.values()}) == 1 and engines["gptj-tune"]["trainable_params"] > 0
    assert 0 < engines["gptj-tune"]["plan_gib"] < 1  # `gptj-tune plan` for this run, compared with the peak on a GPU
    for name, e in engines.items():
        assert e["tokens_per_s"] > 0 and 0 < e["padding_efficiency"] <= 1 and e["peak_memory_gib"] > 0, name
        assert e["tokens_per_s"] == e["end_to_end_tokens_per_s"] == e["real_tokens"] / e["seconds"], name  # 2 steps: no steady part
        assert f"{name} {e['end_to_end_tokens_per_s']:,.0f}" in result.stdout.replace("\n", " "), name
        assert 5 < e["held_out_loss"] < 12, name  # near ln(50400) = 10.8 after two steps from random init
        if name != "gptj-tune":
            assert e["ours_over_this"] == pytest.approx(engines["gptj-tune"]["tokens_per_s"] / e["tokens_per_s"])
    # Model FLOPs are the workload's, the same for every engine; the rate follows each one's speed.
    assert len({(e["flops_per_token"], e["flops_formula"]) for e in engines.values()}) == 1
    for e in engines.values():
        assert e["model_tflops"] == pytest.approx(e["tokens_per_s"] * e["flops_per_token"] / 1e12) and "mfu" not in e
    assert "model FLOPs: 4*N_blocks + 4*N_head*" in result.stdout.replace("\n", "")
    assert engines["trl-best"]["padding_efficiency"] == 1.0  # padding-free packing
    assert engines["hf-trainer"]["padding_efficiency"] < 0.95  # per-batch padding
    # The baselines run transformers' default attention for GPT-J (its own SDPA from 5.24 on, eager
    # before), as their users get it; the JSON says which, and the library versions behind the figures.
    import transformers
    from transformers.models.gptj.modeling_gptj import GPTJPreTrainedModel

    default = "sdpa" if getattr(GPTJPreTrainedModel, "_supports_sdpa", False) else "eager"
    assert {engines[e]["attention"] for e in ("trl-default", "trl-best", "hf-trainer")} == {default}
    assert engines["gptj-tune"]["attention"].startswith("gptj-tune SDPA")
    assert report["settings"]["versions"]["transformers"] == transformers.__version__
    assert f"trl-default {default}" in result.stdout.replace("\n", " ")
    # The plot beside the JSON: a real PNG, three panels side by side, and no temporary file left.
    from matplotlib.image import imread

    height, width = imread(tmp_path / "tt.png").shape[:2]
    assert width > 2 * height > 0 and f"{tmp_path / 'tt.png'}" in result.stdout.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tt.json", "tt.png"]


def test_the_harness_runs_a_gpt_neo_shape_with_the_same_adapters_in_every_engine(tmp_path, shared_data):
    out = tmp_path / "neo.json"
    result = run_benchmark("train_throughput", shared_data, out, "--shape", "neo-tiny", "--records", "8", "--max-length", "128",
                           "--engines", "gptj-tune,trl-best")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train throughput: neo-tiny GPT-Neo, lora" in result.stdout
    engines = json.loads(out.read_text())["engines"]
    assert len({e["real_tokens"] for e in engines.values()}) == 1
    assert len({e["trainable_params"] for e in engines.values()}) == 1 and engines["gptj-tune"]["trainable_params"] > 0
    assert 0 < engines["gptj-tune"]["plan_gib"] < 1  # `gptj-tune plan` for this run, compared with the peak on a GPU
    assert "local layers'" in engines["gptj-tune"]["flops_formula"]
    assert all(5 < e["held_out_loss"] < 12 for e in engines.values())  # near ln(50257)


def test_a_failing_engine_keeps_the_others_rows_and_no_rows_is_a_clear_message(tmp_path, shared_data):
    """TRL not importable (as on the GPU image before its wheels are installed): the trl-best worker
    fails, gptj-tune's row is kept in the JSON and the plot, the failure is named, and the exit code
    says one failed. With no engine left there is no table: one line, and no JSON or plot."""
    hidden = tmp_path / "no-trl" / "trl"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('trl is hidden by this test')\n")
    env = {"PYTHONPATH": f"{hidden.parent}:{REPO}"}
    out = tmp_path / "tt.json"
    args = ("--records", "8", "--max-length", "128")
    result = run_benchmark("train_throughput", shared_data, out, *args, "--engines", "gptj-tune,trl-best", env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["engines"]) == ["gptj-tune"] and report["engines"]["gptj-tune"]["tokens_per_s"] > 0
    assert report["failed"]["trl-best"]["error"] == "ImportError: trl is hidden by this test"
    assert report["failed"]["trl-best"]["exit_code"] == 1 and (tmp_path / "tt.png").exists()
    assert "1 engine(s) failed: trl-best; the others' results are written" in result.stderr
    alone = run_benchmark("train_throughput", shared_data, tmp_path / "none.json", *args, "--engines", "trl-best", env=env)
    assert alone.returncode == 1 and "no engine finished, so there is no table: trl-best: ImportError" in alone.stderr
    assert not (tmp_path / "none.json").exists() and not (tmp_path / "none.png").exists()


def test_the_model_dir_is_built_once_and_reused(tmp_path, shared_data):
    model_dir = tmp_path / "model"
    first = run_benchmark("train_throughput", shared_data, tmp_path / "a.json", "--records", "8", "--max-length", "128",
                          "--engines", "gptj-tune", "--model-dir", str(model_dir))  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"building the tiny model in {model_dir}" in first.stdout.replace("\n", "")
    built = (model_dir / "model.safetensors").stat().st_mtime_ns
    again = run_benchmark("train_throughput", shared_data, tmp_path / "b.json", "--records", "8", "--max-length", "128",
                          "--engines", "gptj-tune", "--model-dir", str(model_dir))  # fmt: skip
    assert again.returncode == 0 and "reusing the tiny model" in again.stdout
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == built
    assert json.loads((tmp_path / "a.json").read_text())["engines"]["gptj-tune"]["held_out_loss"] == pytest.approx(
        json.loads((tmp_path / "b.json").read_text())["engines"]["gptj-tune"]["held_out_loss"])
    other = run_benchmark("train_throughput", shared_data, tmp_path / "c.json", "--shape", "small", "--records", "8",
                          "--engines", "gptj-tune", "--model-dir", str(model_dir))  # fmt: skip
    assert other.returncode == 1 and f"--model-dir {model_dir} holds the tiny shape, not small" in other.stderr


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("train_throughput", ["--max-length", "32"], "--max-length 32: use 64 to 2048"),
        ("train_throughput", ["--steps", "0"], "--steps 0: use 1 or more"),
        ("train_throughput", ["--batch-size", "0"], "--batch-size 0: use 1 or more"),
        ("train_throughput", ["--warmup-steps", "-1"], "--warmup-steps -1: use 0 or more"),
        ("train_throughput", ["--records", "60000"], "--records 60000: use 1 to 50,000"),
        ("train_throughput", ["--engines", "gptj-tune,axolotl"], "--engines: unknown ['axolotl']"),
        ("train_throughput", ["--shape", "gptj-6b"], "the gptj-6b shape runs on a GPU only"),
        ("train_throughput", ["--shape", "gpt-neo-2.7b"], "the gpt-neo-2.7b shape runs on a GPU only"),
        ("recipe_throughput", ["--recipe", "alpaca-lora", "--steps", "4"], "--steps 4: use at least --warmup-steps + 2 (5)"),
        ("recipe_throughput", ["--recipe", "no-such-recipe"], "--recipe no-such-recipe: Recipe is not valid"),
        ("recipe_throughput", ["--recipe", "chat-quickstart"], "no shared data for its 'synthetic' source"),
        ("recipe_throughput", ["--recipe", "alpaca-lora", "--set", "train.lr=-1"], "`train.lr` (from --set): Input should be greater than 0"),
        ("recipe_throughput", ["--recipe", "alpaca-lora", "--shape", "gptj-6b"], "the gptj-6b shape runs on a GPU only"),
        ("eval_speed", ["--limit", "0"], "--limit 0: use 1 or more"),
        ("eval_speed", ["--tasks", "piqa,mmlu"], "--tasks: unknown ['mmlu']; choose from lambada_openai"),
        ("eval_speed", ["--shape", "gptj-6b"], "the gptj-6b shape runs on a GPU only"),
    ],
)
def test_benchmark_arguments_are_checked_before_any_work(tmp_path, shared_data, script, args, message):
    result = run_benchmark(script, shared_data, tmp_path / "x.json", *args, timeout=120)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()


def test_the_plot_is_written_beside_the_json_never_over_it(tmp_path, shared_data):
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--data-dir", str(shared_data), "--out", str(tmp_path / "r.png")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"--out {tmp_path / 'r.png'}: name the JSON (e.g. {tmp_path / 'r.json'})" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_a_plot_that_fails_to_draw_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    tt = _benchmark_module()
    row = {"tokens_per_s": 1130.0, "peak_memory_gib": 1.74, "held_out_loss": 8.8427}
    rows = {"gptj-tune": row, "trl-default": row | {"tokens_per_s": 224.0, "ours_over_this": 5.04, "held_out_loss": 9.451}}
    plot = tmp_path / "r.png"
    assert tt.results_plot("t", rows, plot, gpu=False) and plot.read_bytes().startswith(b"\x89PNG")
    earlier = plot.read_bytes()

    def broken_savefig(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        tt.results_plot("t", rows | {"hf-trainer": row}, plot, gpu=False)
    assert plot.read_bytes() == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


def test_eval_speed_runs_the_chosen_tasks_and_writes_json(tmp_path, shared_data):
    out = tmp_path / "es.json"
    # Two tasks (a loglikelihood-of-continuation one and a multiple-choice one): every task's
    # scoring through the harness is tested in evaluate/test_eval_command.py; this checks the script's own work.
    result = run_benchmark("eval_speed", shared_data, out, "--limit", "2", "--batch-size", "2", "--tasks", "lambada_openai,piqa")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["device"] == "cpu" and report["batch_size"] == 2
    assert [r["task"] for r in report["results"]] == ["lambada_openai", "piqa"]
    for r in report["results"]:
        assert r["items"] == 2 and r["items_per_s"] == pytest.approx(2 / r["seconds"]) and 0 <= r["metrics"]["acc"] <= 1
    assert "lm-eval speed: tiny on cpu" in result.stdout


def _benchmark_module(name: str = "train_throughput"):
    """A module of benchmarks/ (they import each other by plain name, as scripts do)."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_steady_rate_leaves_the_first_steps_out():
    """Tokens/s from the end of the warm-up steps to the last step's end: a slow first step (start-up,
    torch.compile) does not count; too few steps after the warm-up give None (end to end instead)."""
    engines = _benchmark_module("engines")
    marks = [[10.0, 100], [11.0, 200], [12.0, 300], [13.0, 400]]  # 10 s first step, then 100 tokens/s
    assert engines.steady_rate(marks, 1) == pytest.approx(100.0)
    assert engines.steady_rate(marks, 0) == pytest.approx(400 / 13)
    assert engines.steady_rate(marks, 3) is None


@pytest.mark.parametrize("shape", ["tiny", "small", "gptj-6b", "neo-tiny", "gpt-neo-2.7b"])
def test_the_flop_count_counts_the_weights_a_real_model_multiplies_by(shape):
    """The benchmark's weight counts are those of the GPT-J (or GPT-Neo) it builds, and of the
    adapters peft adds (gptj-tune's default targets for the family)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tt = _benchmark_module("workload")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tt.config_of(shape))
    assert model.config.model_type == tt.family(shape)
    counts = tt.matmul_params(shape, "lora")
    assert counts["blocks"] == sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
    assert counts["head"] == model.lm_head.weight.numel() == model.transformer.wte.weight.numel()
    lora = get_peft_model(model, _benchmark_module("engines")._lora_config(shape))
    assert counts["adapters"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) > 0
    assert tt.matmul_params(shape, "full") == counts | {"adapters": 0}


def test_the_flop_count_takes_the_scored_tokens_and_the_spans_of_the_examples():
    from types import SimpleNamespace as Example

    tt = _benchmark_module("workload")
    # 3 + 2 real tokens; next-token labels scored: 1 of the first's, 1 of the second's; causal
    # spans 1+2+3 and 1+2.
    examples = [Example(input_ids=[5, 6, 7], labels=[-100, -100, 7]), Example(input_ids=[8, 9], labels=[-100, 9])]
    stats = tt.token_stats(examples)
    assert stats == {"scored_share": 2 / 5, "mean_span": 9 / 5}
    d, layers, n = 64, 2, tt.matmul_params("tiny", "full")
    full, formula = tt.flops_per_token({"shape": "tiny", "method": "full"}, stats)
    assert full == pytest.approx(6 * 12 * d * d * layers + 6 * 50400 * d * 0.4 + 12 * layers * d * 1.8)
    assert full == pytest.approx(6 * n["blocks"] + 6 * n["head"] * 0.4 + 12 * layers * d * 1.8)
    assert "6*N_blocks + 6*N_head*0.400" in formula and "1.8 (mean causal span)" in formula
    lora, formula = tt.flops_per_token({"shape": "tiny", "method": "lora"}, stats)
    adapters = tt.matmul_params("tiny", "lora")["adapters"]
    assert lora == pytest.approx(4 * n["blocks"] + 4 * n["head"] * 0.4 + 6 * adapters + 12 * layers * d * 1.8)
    assert "N_lora" in formula
    # GPT-Neo: one global and one local layer; the local one attends within its window (2 here):
    # spans 1+2+2 and 1+2
    windowed = tt.token_stats(examples, window=2)
    assert windowed == {"scored_share": 2 / 5, "mean_span": 9 / 5, "mean_local_span": 8 / 5}
    neo, formula = tt.flops_per_token({"shape": "neo-tiny", "method": "full"}, windowed)
    n = tt.matmul_params("neo-tiny", "full")
    assert n["head"] == 50257 * d
    assert neo == pytest.approx(6 * n["blocks"] + 6 * n["head"] * 0.4 + 12 * d * (1 * 1.8 + 1 * 1.6))
    assert "(1*1.8 (global layers' mean causal span) + 1*1.6 (local layers'))" in formula


@pytest.mark.parametrize("gpu", [False, True])
def test_the_results_table_fits_an_80_column_terminal_whole(gpu):
    """Every header and figure printed in full (rich cuts what does not fit to "…"), MFU column too."""
    from rich.console import Console

    tt = _benchmark_module()
    row = {"tokens_per_s": 123_456.0, "end_to_end_tokens_per_s": 101_234.0, "padding_efficiency": 0.552, "peak_memory_gib": 71.234, "held_out_loss": 10.70491,
           "steps": 1234, "model_tflops": 456.7, "mfu": 0.4567}  # fmt: skip
    rows = {"gptj-tune": row, "trl-default": row | {"ours_over_this": 27.21}, "trl-best": row | {"ours_over_this": 3.5}}
    console = Console(width=80, record=True)
    console.print(tt.results_table("train throughput: gptj-6b GPT-J, lora, 2000 Alpaca records", rows, gpu=gpu))
    text = console.export_text()
    assert "…" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= 80
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "real ours/ padding peak held-out model" in lines
    assert ("engine tok/s this eff. GiB loss steps TFLOP/s" + (" MFU" if gpu else "")) in lines
    assert ("trl-default 123,456 27.21x 0.552 71.23 10.7049 1234 457" + (" 45.7%" if gpu else "")) in lines


def test_a_recipes_flop_count_takes_its_own_rank_and_targets():
    """recipe_throughput counts with the benchmark's formula over the packed rows a recipe trains on
    (positions restart at each example), with the recipe's own LoRA rank and targets: its default
    and `all-linear` are the six linears."""
    from types import SimpleNamespace as Row

    rt, tt = _benchmark_module("recipe_throughput"), _benchmark_module("workload")
    rows = [Row(position_ids=[0, 1, 2, 0, 1], labels=[-100, -100, 7, -100, 9])]  # the two examples above, packed
    stats = rt.row_stats(rows, None)
    assert stats == {"scored_share": 2 / 5, "mean_span": 9 / 5}
    assert rt.row_stats(rows, 2) == stats | {"mean_local_span": 8 / 5}

    def recipe(r, targets):
        return Row(method=Row(kind="lora", r=r, target_modules=targets))

    default, about = rt.flops_per_token(recipe(16, None), "tiny", rows)
    assert default == pytest.approx(tt.flops_per_token({"shape": "tiny", "method": "lora"}, stats)[0])
    assert about["real_tokens_sampled"] == 5
    assert rt.flops_per_token(recipe(16, "all-linear"), "tiny", rows)[0] == default
    d, layers = 64, 2
    r64, _ = rt.flops_per_token(recipe(64, ["q_proj", "v_proj"]), "tiny", rows)  # 6 x (64 x 2 x (d + d) - 16 x 18 d) a layer
    assert r64 - default == pytest.approx(6 * layers * d * (64 * 2 * 2 - 16 * 18))
    full, _ = rt.flops_per_token(Row(method=Row(kind="full")), "tiny", rows)
    assert full == pytest.approx(tt.flops_per_token({"shape": "tiny", "method": "full"}, stats)[0])


def run_session(tmp_path, shared_data, out_name: str, **env: str) -> tuple[subprocess.CompletedProcess, str, Path]:
    """benchmarks/gpu_session.sh, the device calls of the GPU issues, dry-run on the tiny shapes:
    the process, its session.log and its $OUT."""
    import os

    out = tmp_path / out_name
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "SHAPE": "tiny", "LORA_STEPS": "2", "FULL_STEPS": "2",
           "PROFILE_STEPS": "2", "MAX_LENGTH": "128", "DATA": str(shared_data), "MODEL": str(tmp_path / "model"),
           "PYTHONPATH": str(REPO), **env}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    return result, (out / "session.log").read_text(), out


def test_the_gpu_session_script_runs_its_steps_on_the_cpu(tmp_path, shared_data):
    """The first device call: each step logged with its exit code, the results under $OUT (at most
    8 files come back), the built model deleted."""
    result, log, out = run_session(tmp_path, shared_data, "out")
    assert result.returncode == 0, result.stdout + log[-3000:]
    for step in ("profile-lora", "lora", "profile-full", "full", "qlora"):
        assert f"== {step}: exit 0" in log, log[-3000:]
    assert "== done: 0 step(s) failed" in log and "where a step goes: tiny full" in log
    names = sorted(p.name for p in out.iterdir())  # at most 8 files come back from the device
    assert names == ["full.json", "full.png", "lora.json", "lora.png", "profile-full.json", "profile-lora.json",
                     "qlora.json", "session.log"]  # fmt: skip
    for name in ("lora", "qlora"):
        assert set(json.loads((out / f"{name}.json").read_text())["engines"]) == {"gptj-tune", "trl-best"}
    assert not (tmp_path / "model").exists()


def test_the_gpu_sessions_recipes_and_optimizer_call_runs_on_the_cpu(tmp_path, shared_data):
    """The second device call: the shipped recipes as users run them and the optimizer's step, three files."""
    result, log, out = run_session(tmp_path, shared_data, "second", PHASES="build-model recipes optimizer", RECIPE_STEPS="5",
                                   RECIPE_SET="--set train.grad_accum=1 --set model.dtype=float32")  # fmt: skip
    assert result.returncode == 0 and "== recipes: exit 0" in log and "== optimizer: exit 0" in log, result.stdout + log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["optimizer.json", "recipes.json", "session.log"]
    recipes = json.loads((out / "recipes.json").read_text())["recipes"]
    assert [(r["recipe"], r["rows_per_step"], r["max_length"], r["steps"]) for r in recipes] == [
        ("alpaca-lora", 8, 512, 5), ("novel-domain", 2, 2048, 5)]  # their own batches and lengths (accumulation set to 1)
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["plan_gib"] > 0 for r in recipes)
    optimizer = json.loads((out / "optimizer.json").read_text())
    assert optimizer["tensors"] == 25 and set(optimizer["rows"]) == {"per weight", "batched", "chunked"}  # tiny GPT-J
    assert all(row["ms_per_step"] > 0 for row in optimizer["rows"].values()) and "KahanAdamW step" in log
    assert not (tmp_path / "model").exists()


def test_the_gpu_sessions_gpt_neo_call_runs_on_the_cpu(tmp_path, shared_data):
    """The third device call: GPT-Neo against TRL best, three files."""
    neo_model = tmp_path / "neo-model"
    result, log, out = run_session(tmp_path, shared_data, "neo-out", PHASES="build-neo neo", NEO_SHAPE="neo-tiny",
                                   NEO_MODEL=str(neo_model))  # fmt: skip
    assert result.returncode == 0 and "== neo: exit 0" in log, result.stdout + log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["neo.json", "neo.png", "session.log"]
    assert set(json.loads((out / "neo.json").read_text())["engines"]) == {"gptj-tune", "trl-best"}
    assert not neo_model.exists()


def test_the_profile_says_where_a_steps_time_goes(tmp_path, shared_data):
    out = tmp_path / "p.json"
    result = run_benchmark("profile_step", shared_data, out, "--max-length", "256", "--rows", "2", "--warmup", "2", "--steps", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["steps"] == 3 and summary["step_ms"] > 0
    assert sum(k["share"] for k in summary["by_kind"].values()) == pytest.approx(1.0)
    assert {"GEMM", "attention", "optimizer", "elementwise"} <= set(summary["by_kind"])
    assert summary["top_ops"][0]["ms_per_step"] > 0 and summary["per_step"]["operators_dispatched"] > 100
    assert "where a step goes: tiny lora" in out.with_suffix(".txt").read_text()


def test_profile_kinds_and_busy_time():
    profile_step = _benchmark_module("profile_step")
    assert profile_step.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert profile_step.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile_step.kind_of("aten::_fused_adamw_") == "optimizer"
    assert profile_step.kind_of("Memcpy DtoH (Device -> Pinned)") == "copies"
    assert profile_step.kind_of("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"
    assert profile_step.merged_busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
