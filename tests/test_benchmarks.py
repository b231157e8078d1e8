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


def run_benchmark(script: str, shared_data, out, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python benchmarks/<script>.py ... --data-dir <shared data> --out <out>`, as a user runs it."""
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args, "--data-dir", str(shared_data), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
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
    for name, e in engines.items():
        assert e["tokens_per_s"] > 0 and 0 < e["padding_efficiency"] <= 1 and e["peak_memory_gib"] > 0, name
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


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("train_throughput", ["--max-length", "32"], "--max-length 32: use 64 to 2048"),
        ("train_throughput", ["--steps", "0"], "--steps 0: use 1 or more"),
        ("train_throughput", ["--batch-size", "0"], "--batch-size 0: use 1 or more"),
        ("train_throughput", ["--records", "60000"], "--records 60000: use 1 to 50,000"),
        ("train_throughput", ["--engines", "gptj-tune,axolotl"], "--engines: unknown ['axolotl']"),
        ("train_throughput", ["--shape", "gptj-6b"], "the gptj-6b shape runs on a GPU only"),
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


@pytest.mark.slow
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


def _benchmark_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import train_throughput
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return train_throughput


@pytest.mark.parametrize("shape", ["tiny", "small", "gptj-6b"])
def test_the_flop_count_counts_the_weights_a_real_model_multiplies_by(shape):
    """The benchmark's weight counts are those of the GPT-J it builds, and of the adapters peft adds."""
    import torch
    from peft import get_peft_model
    from transformers import GPTJConfig, GPTJForCausalLM

    tt = _benchmark_module()
    with torch.device("meta"):
        model = GPTJForCausalLM(GPTJConfig(vocab_size=tt.VOCAB, **tt.SHAPES[shape]))
    counts = tt.matmul_params(shape, "lora")
    assert counts["blocks"] == sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
    assert counts["head"] == model.lm_head.weight.numel() == model.transformer.wte.weight.numel()
    lora = get_peft_model(model, tt._lora_config())
    assert counts["adapters"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) > 0
    assert tt.matmul_params(shape, "full") == counts | {"adapters": 0}


def test_the_flop_count_takes_the_scored_tokens_and_the_spans_of_the_examples():
    from types import SimpleNamespace as Example

    tt = _benchmark_module()
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


@pytest.mark.parametrize("gpu", [False, True])
def test_the_results_table_fits_an_80_column_terminal_whole(gpu):
    """Every header and figure printed in full (rich cuts what does not fit to "…"), MFU column too."""
    from rich.console import Console

    tt = _benchmark_module()
    row = {"tokens_per_s": 123_456.0, "padding_efficiency": 0.552, "peak_memory_gib": 71.234, "held_out_loss": 10.70491,
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
