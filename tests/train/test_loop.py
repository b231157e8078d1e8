"""End to end through the real CLI on the tiny model: learning, resume, signals, guards."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import can_compile, cli, small_recipe


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def resume_a_copy(recipe, run, copy, *args: str):
    """Copy a finished 20-step run, drop its step-20 checkpoint and final/, and resume the copy from step-10."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-20")
    shutil.rmtree(copy / "final")
    return cli("run", str(recipe), *args, "--resume", "step-10", "--set", f"output.dir={copy}")


@pytest.mark.slow
def test_loss_falls_and_run_dir_is_complete(tmp_path):
    recipe = small_recipe(tmp_path, steps=30, save_every=10)
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.8, (first, last)  # measured: 6.21 -> 4.96 in 30 LoRA steps
    for name in ("recipe.yaml", "summary.json", "final/adapter_config.json", "final/adapter_model.safetensors",
                 "final/tokenizer.json", "base-model/config.json"):  # fmt: skip
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-20", "step-30"]
    assert "held-out loss" in result.stdout and "Run finished" in result.stdout
    line = next(m for m in metrics(run) if m["step"] == 5)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "epoch"} <= line.keys()
    # The frozen recipe is a complete recipe that validates again.
    again = cli("validate", str(run / "recipe.yaml"))
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_without_a_checkpoint_at_end_only_final_is_written(tmp_path):
    """train.checkpoint_at_end: false (benchmarks: a 6B full run's last checkpoint would not fit the
    disk) keeps the periodic checkpoints and final/, and writes none after the last step."""
    recipe = small_recipe(tmp_path, steps=12, save_every=5)
    result = cli("run", str(recipe), "--set", "train.checkpoint_at_end=false")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-5"]
    assert (run / "final" / "adapter_model.safetensors").exists() and sorted(losses(run)) == list(range(1, 13))


def test_a_warmup_as_long_as_the_run_is_named_and_each_step_logs_the_rate_it_used(tmp_path):
    """A warmup that does not end before the last step (a 30-step warmup in a short trial run) is
    a warning with the share of train.lr the run ends at; a shorter one says nothing. Each step's
    `lr` is the rate its update used (k/6 of train.lr at step k of a 5-step warmup), not the next
    step's, which the scheduler has moved to when the line is written."""
    recipe = small_recipe(tmp_path, steps=3, save_every=10)
    result = cli("run", str(recipe), "--set", "train.warmup_steps=5", "--set", "train.log_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warmup's 5 steps are not fewer than this run's 3 optimizer steps" in result.stdout
    assert "ends at 50% of train.lr; set train.warmup_steps below 3" in result.stdout
    lrs = [m["lr"] for m in metrics(tmp_path / "run") if "lr" in m]
    assert lrs == pytest.approx([3e-3 * k / 6 for k in (1, 2, 3)])
    result = cli("run", str(recipe), "--set", "train.max_steps=4", "--set", f"output.dir={tmp_path / 'short'}")
    assert result.returncode == 0 and "warning" not in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_final_adapter_loads_on_the_base_model(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert cli("run", str(small_recipe(tmp_path, steps=4, save_every=4))).returncode == 0
    run = tmp_path / "run"
    base = AutoModelForCausalLM.from_pretrained(run / "base-model")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, run / "final")
    assert (model(input_ids=ids).logits - before).abs().max() > 1e-4  # the adapter changed the model


@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_curve_and_saves_the_same_adapter(tmp_path):
    """train.compile: the same LoRA run (no dropout: inductor draws its own random numbers) with
    compiled blocks logs the eager run's losses, over batches of different widths."""
    if not can_compile():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    curves = {}
    for mode in ("eager", "compiled"):
        recipe = small_recipe(tmp_path, steps=6, save_every=6, out=tmp_path / mode, name=f"{mode}.yaml")
        extra = ["--set", "train.compile=true"] if mode == "compiled" else []
        result = cli("run", str(recipe), "--set", "method.dropout=0.0", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("torch.compile: 2 blocks" in result.stdout) == (mode == "compiled")
        curves[mode] = losses(tmp_path / mode)
    assert sorted(curves["compiled"]) == list(range(1, 7))
    assert max(abs(curves["eager"][s] - curves["compiled"][s]) for s in range(1, 7)) < 1e-3, curves
    assert curves["compiled"][6] < curves["compiled"][1]
    from safetensors.torch import load_file

    eager, compiled = (load_file(tmp_path / mode / "final" / "adapter_model.safetensors") for mode in ("eager", "compiled"))
    assert eager.keys() == compiled.keys() and max((eager[k] - compiled[k]).abs().max() for k in eager) < 1e-3


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_same_curve(tmp_path):
    """LoRA with dropout 0.1: equality needs the data position and the RNG state restored."""
    uninterrupted = small_recipe(tmp_path, steps=40, save_every=100, out=tmp_path / "a", name="a.yaml")
    assert cli("run", str(uninterrupted)).returncode == 0
    interrupted = small_recipe(tmp_path, steps=40, save_every=100, out=tmp_path / "b", name="b.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(interrupted)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way, then press Ctrl-C
        if (tmp_path / "b" / "metrics.jsonl").exists() and len(metrics(tmp_path / "b")) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    command = f"gptj-tune run {tmp_path / 'b' / 'recipe.yaml'} --resume"  # the run's frozen recipe: any --set kept
    assert "checkpoint saved to" in err and f"Continue with: {command}" in err, err[-3000:]
    [stopped_at] = [int(p.name.split("-")[1]) for p in (tmp_path / "b" / "checkpoints").iterdir()]
    assert 4 <= stopped_at < 40
    resumed = cli(*command.split()[1:])  # the command it printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


@pytest.mark.slow
def test_ctrl_c_before_the_training_loop_stops_at_once_without_a_traceback(tmp_path):
    """A signal while the run prepares (here: tokenizing 30,000 records) ends it with exit 130 and one
    line, not a KeyboardInterrupt traceback from inside a library, and leaves no checkpoint."""
    recipe = small_recipe(tmp_path, steps=40)
    recipe.write_text(recipe.read_text().replace("count: 600", "count: 30000"))
    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "run" / "recipe.yaml").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "stopped by SIGINT outside the training loop" in err and "Traceback" not in out + err, err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_signal_after_the_steps_collective_stops_after_the_next_step(tmp_path, monkeypatch):
    """The stop checkpoint is the one every process agreed on in a step's collective. A signal that
    lands after that collective (here: during the step's eval, on the one process) is a request
    for the next step's: with ZeRO-3 or FSDP a process saving on its own, while the others step on,
    hung CI's interrupted ZeRO-3 LoRA run."""
    import os

    from gptj_tune.train import loop

    real_evaluate = loop.evaluate_loss

    def evaluate_then_signalled(*args, **kwargs):
        loss = real_evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here: after the collective, before the save
        return loss

    monkeypatch.setattr(loop, "evaluate_loss", evaluate_then_signalled)
    recipe = small_recipe(tmp_path, steps=20, save_every=100)
    result = cli("run", str(recipe), "--set", "eval.every_steps=4")
    assert result.returncode == 130, result.stdout[-2000:] + result.stderr[-2000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-5"]


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_full_finetune(tmp_path):
    recipe = small_recipe(tmp_path, method="full", steps=20, save_every=10, lr=1e-3)
    assert cli("run", str(recipe)).returncode == 0
    run, copy = tmp_path / "run", tmp_path / "copy"
    resumed = resume_a_copy(recipe, run, copy)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(run), losses(copy)
    assert sorted(b) == list(range(1, 21)) and max(abs(a[s] - b[s]) for s in range(11, 21)) < 1e-5
    from safetensors.torch import load_file

    wa, wb = load_file(run / "final" / "model.safetensors"), load_file(copy / "final" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    missing = cli("run", str(recipe), "--resume", "step-7")
    assert missing.returncode == 2 and "no checkpoint 'step-7'; available: step-10, step-20" in missing.stderr


@pytest.mark.slow
def test_a_cut_metrics_line_and_a_finished_run_resume_cleanly(tmp_path):
    """A metrics.jsonl line cut short (the disk filled mid-write) is dropped with a note on resume,
    not a JSONDecodeError on every resume after; resuming a finished run says there is nothing left
    to train and leaves one end-of-run line, not two."""
    recipe = small_recipe(tmp_path, steps=20, save_every=10)
    assert cli("run", str(recipe)).returncode == 0
    run, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-20")
    shutil.rmtree(copy / "final")
    text = (copy / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(text + '{"step": 21, "loss": 1.23')  # a line cut mid-write
    resumed = cli("run", str(recipe), "--resume", "step-10", "--set", f"output.dir={copy}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 damaged line(s)" in resumed.stdout.replace("\n", " ") and "Traceback" not in resumed.stderr
    assert sorted(losses(copy)) == list(range(1, 21))
    finished = cli("run", str(recipe), "--resume", "latest")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "nothing left to train" in finished.stdout.replace("\n", " ")
    assert sum("final_eval_loss" in m for m in metrics(run)) == 1 and sorted(losses(run)) == list(range(1, 21))


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = small_recipe(tmp_path, method="full", steps=5, save_every=100, out=tmp_path / "big", name="big.yaml")
    assert cli("run", str(big), "--set", "train.batch_size=8").returncode == 0
    small = small_recipe(tmp_path, method="full", steps=5, save_every=100, out=tmp_path / "acc", name="acc.yaml")
    assert cli("run", str(small), "--set", "train.batch_size=4", "--set", "train.grad_accum=2").returncode == 0
    a, b = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    recipe = small_recipe(tmp_path, method="full", steps=50, save_every=1, lr=1)  # fp16 weights overflow at step 3
    result = cli("run", str(recipe), "--set", "train.max_grad_norm=null", "--set", "model.dtype=float16")
    assert result.returncode == 1
    # the newest checkpoint (step 2) holds the weights that gave the NaN: it is not called good
    assert "training stopped before the update (the weights of " in result.stderr
    assert "step-2 gave it; the one before it: " in result.stderr and "(--resume step-1)" in result.stderr
    assert "Lower train.lr" in result.stderr and "Traceback" not in result.stderr
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved and not (tmp_path / "run" / "final").exists()
    listed = cli("runs", str(tmp_path))
    assert listed.returncode == 0 and "failed at step 3: loss is nan" in listed.stdout


@pytest.mark.slow
def test_existing_run_dir_is_never_overwritten_silently(tmp_path):
    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    assert cli("run", str(recipe)).returncode == 0
    again = cli("run", str(recipe))
    assert again.returncode == 2 and "already holds a run. Use --resume" in again.stderr
    changed = cli("run", str(recipe), "--resume", "--set", "train.lr=0.5")
    assert changed.returncode == 2 and "train.lr (0.003 -> 0.5)" in changed.stderr
    forced = cli("run", str(recipe), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]


@pytest.mark.slow
def test_a_start_that_failed_in_setup_can_be_run_again_without_force(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\nnot json\n')
    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    first = cli("run", str(recipe), "--set", f"data.sources=[{{format: alpaca, path: {bad}}}]", "--set", "model.tiny.width=32")
    assert first.returncode == 2 and "Traceback" not in first.stderr
    run = tmp_path / "run"
    assert (run / "recipe.yaml").exists() and (run / "base-model" / "config.json").exists()  # set up, then stopped
    resumed = cli("run", str(recipe), "--resume")
    assert resumed.returncode == 2 and "start it again without --resume" in resumed.stderr
    again = cli("run", str(recipe))  # no --force needed: nothing of a run was there to lose
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "base-model" / "config.json").read_text())["n_embd"] == 64  # rebuilt, not the stale 32-wide one
    assert "width: 32" not in (run / "recipe.yaml").read_text()
    refused = cli("run", str(recipe))  # a run with results is still never replaced without --force
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    # Someone's own recipe.yaml (not the canonical one a run freezes) is never taken for leftovers.
    own = tmp_path / "own"
    own.mkdir()
    (own / "recipe.yaml").write_text(recipe.read_text())
    mine = cli("run", str(own / "recipe.yaml"), "--set", f"output.dir={own}")
    assert mine.returncode == 2 and "holds a recipe.yaml that no run wrote there" in mine.stderr
    assert (own / "recipe.yaml").read_text() == recipe.read_text()
    # A run's own frozen recipe restarts it with --force.
    restarted = cli("run", str(run / "recipe.yaml"), "--force")
    assert restarted.returncode == 0, restarted.stderr[-2000:]


@pytest.mark.slow
def test_force_never_deletes_the_recipe_its_data_or_the_current_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text("")  # a run directory with results, which --force would delete
    records = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(40)]
    (run / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = small_recipe(tmp_path, steps=2, save_every=2)
    data = cli("run", str(recipe), "--force", "--set", f"data.sources=[{{format: alpaca, path: {run / 'data.jsonl'}}}]")
    assert data.returncode == 2 and f"it holds a data source ({run / 'data.jsonl'})" in data.stderr
    inside = small_recipe(run, steps=2, save_every=2, out=run, name="my.yaml")
    own = cli("run", str(inside), "--force")
    assert own.returncode == 2 and "it holds the recipe being run" in own.stderr
    monkeypatch.chdir(run)
    here = cli("run", str(recipe), "--force", "--set", "output.dir=.")
    assert here.returncode == 2 and "that is the current directory" in here.stderr
    assert sorted(p.name for p in run.iterdir()) == ["data.jsonl", "metrics.jsonl", "my.yaml", "recipe.yaml"]
    assert "Traceback" not in data.stderr + own.stderr + here.stderr


@pytest.mark.slow
def test_a_bf16_full_run_uses_kahan_summation_and_resumes_the_same_curve(tmp_path):
    recipe = small_recipe(tmp_path, method="full", steps=20, save_every=10, lr=1e-4)
    run = cli("run", str(recipe), "--set", "model.dtype=bfloat16")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "round to nothing" not in run.stdout + run.stderr
    curve = losses(tmp_path / "run")
    assert curve[20] < curve[1] - 0.1
    resumed = resume_a_copy(recipe, tmp_path / "run", tmp_path / "copy", "--set", "model.dtype=bfloat16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = losses(tmp_path / "copy")
    assert max(abs(curve[s] - again[s]) for s in range(11, 21)) < 1e-5
    plain = cli("run", str(recipe), "--set", "model.dtype=bfloat16", "--set", "train.kahan_summation=false",
                "--set", "train.max_steps=2", "--set", f"output.dir={tmp_path / 'plain'}")  # fmt: skip
    assert plain.returncode == 0 and "round to nothing" in plain.stdout + plain.stderr and "kahan_summation: true" in plain.stdout + plain.stderr


@pytest.mark.slow
def test_a_bf16_full_run_with_8bit_optimizer_states_learns_and_resumes_the_same_curve(tmp_path):
    recipe = small_recipe(tmp_path, method="full", steps=20, save_every=10, lr=1e-4)
    eight = ["--set", "model.dtype=bfloat16", "--set", "train.optimizer=adamw_8bit"]
    run = cli("run", str(recipe), *eight)
    assert run.returncode == 0, run.stderr[-3000:]
    curve = losses(tmp_path / "run")
    assert curve[20] < curve[1] - 0.1
    import torch

    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-10" / "optimizer.pt", weights_only=True)
    assert {v["exp_avg"].dtype for v in saved["state"].values()} == {torch.uint8}
    resumed = resume_a_copy(recipe, tmp_path / "run", tmp_path / "copy", *eight)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = losses(tmp_path / "copy")
    assert max(abs(curve[s] - again[s]) for s in range(11, 21)) < 1e-5
    switched = resume_a_copy(recipe, tmp_path / "run", tmp_path / "other", "--set", "model.dtype=bfloat16")
    assert switched.returncode != 0 and "train.optimizer" in switched.stderr and "Traceback" not in switched.stderr


class _Payload:
    """What an attacker would plant in a run directory: unpickling it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("the payload ran")


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["rng-0.pt", "optimizer.pt", "scheduler.pt", "token store"])
def test_a_payload_planted_in_a_run_directory_does_not_run_on_resume(tmp_path, planted):
    """RNG states are saved as tensors and numbers and read with weights_only=True (they were
    pickled, and `torch.load(weights_only=False)` ran whatever a planted rng-0.pt held); the
    optimizer and scheduler states too, and the token store's .npy arrays without pickle."""
    import numpy as np
    import torch

    from gptj_tune.manifest import write_manifest

    cache = tmp_path / "data-cache"
    recipe = small_recipe(tmp_path, steps=4, save_every=2)
    recipe.write_text(recipe.read_text().replace("  max_length: 128\n", f"  max_length: 128\n  cache_dir: {cache}\n"))
    assert cli("run", str(recipe)).returncode == 0
    step = tmp_path / "run" / "checkpoints" / "step-2"
    marker = tmp_path / "payload-ran"
    if planted == "token store":
        [starts] = cache.rglob("train-starts.npy")
        np.save(starts, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    else:
        torch.save({"state": _Payload(marker)}, step / planted)
        write_manifest(step)  # as whoever planted it would: the manifest alone does not stop it
    result = cli("run", str(recipe), "--resume", "step-2")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert not marker.exists() and "Traceback" not in result.stderr
    if planted == "token store":
        assert "train-starts.npy" in result.stderr and "pickled" in result.stderr
    else:
        assert f"{planted} holds pickled Python objects, which gptj-tune does not load" in result.stderr