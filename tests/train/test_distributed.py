"""Two CPU processes on gloo, for real: DDP, DeepSpeed ZeRO-2/3 and FSDP train the same curve as one
process with the same global batch; ZeRO-3 and FSDP checkpoints resume, and `export` consolidates
their shards offline; final/ is complete; failures end the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, write_recipe
from two_processes import FULL, LORA, free_port, losses, own_tmpdir, recipe_file, run_args

from gptj_tune.errors import RecipeError
from gptj_tune.recipe import load_recipe

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5  # measured: DDP, ZeRO-2, ZeRO-3 and FSDP within 7e-7 of one process per step


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 4: the reference for two processes with batch 2 each."""
    tmp = tmp_path_factory.mktemp("single")
    recipe = recipe_file(tmp)
    result = cli("run", str(recipe), *run_args(tmp / "run"), "--set", "train.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("backend,stage", [("ddp", None), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", None)])
def test_two_processes_train_the_single_process_curve(tmp_path, single_run, backend, stage):
    result = cli("run", str(recipe_file(tmp_path)), *run_args(tmp_path / "run", backend, stage))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"({backend}, 2 processes)" in result.stdout
    ours, reference = losses(tmp_path / "run"), losses(single_run)
    assert sorted(ours) == sorted(reference) == list(range(1, 13))
    assert max(abs(ours[s] - reference[s]) for s in ours) < TOLERANCE
    assert ours[12] < ours[1] - 1.0  # and it learned
    # final/ is one complete model, loadable with plain from_pretrained, equal to the 1-process result.
    assert _final_logits_diff(tmp_path / "run", single_run) < 1e-4


def single_and_ddp_curves(tmp_path, method: str, lr: float) -> dict:
    """`method` run on one process (batch 4, into one/) and on two DDP processes (batch 2 each, into
    two/): both finish and log the same 12-step curve; returns the DDP run's losses."""
    recipe = recipe_file(tmp_path, method)
    single = cli("run", str(recipe), *run_args(tmp_path / "one"), "--set", "train.batch_size=4", "--set", f"train.lr={lr}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = cli("run", str(recipe), *run_args(tmp_path / "two", "ddp"), "--set", f"train.lr={lr}")
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    ours, reference = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(ours) == sorted(reference) == list(range(1, 13))
    assert max(abs(ours[s] - reference[s]) for s in ours) < TOLERANCE
    return ours


@pytest.mark.slow
def test_a_soft_prompt_trains_the_single_process_curve_on_two_ddp_processes(tmp_path):
    from gptj_tune.model.prompt_tuning import read_prompt

    single_and_ddp_curves(tmp_path, "{kind: prompt_tuning, num_virtual_tokens: 8}", lr=3e-2)
    torch.testing.assert_close(read_prompt(tmp_path / "two" / "final"), read_prompt(tmp_path / "one" / "final"), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_qlora_trains_the_single_process_curve_on_two_ddp_processes(tmp_path):
    """Each process holds the 4-bit base (bitsandbytes, on the CPU here); DDP averages the adapters'
    gradients: the one-process curve, and the same adapter."""
    from safetensors.torch import load_file

    ours = single_and_ddp_curves(tmp_path, "{kind: qlora, r: 4, dropout: 0.0}", lr=1e-2)
    assert ours[12] < ours[1] - 0.3
    a = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def _final_logits_diff(run_a, run_b) -> float:
    """Largest logit difference between two runs' final/ folders."""
    return _logits_diff(run_a / "final", run_b / "final")


def _logits_diff(folder_a, folder_b) -> float:
    """Largest logit difference between two model folders, each loaded with plain from_pretrained
    (here in the test process; test_export checks loading in a fresh one)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits for folder in (folder_a, folder_b))
    return (a - b).abs().max().item()


ENGINES = {
    "zero3-full": (FULL, "deepspeed", 3, []),
    "zero3-lora": (LORA, "deepspeed", 3, []),
    "fsdp-full-sharded": (FULL, "fsdp", None, []),
    "fsdp-lora-fullstate": (LORA, "fsdp", None, ["--set", "distributed.fsdp.state_dict_type=full"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ENGINES))
def test_sharded_run_interrupted_and_resumed_continues_the_same_curve(tmp_path, case):
    method, backend, stage, extra = ENGINES[case]
    recipe = recipe_file(tmp_path, method=method, steps=30)
    straight = cli("run", str(recipe), *run_args(tmp_path / "straight", backend, stage), *extra)
    assert straight.returncode == 0, straight.stderr[-3000:]
    if method == FULL:  # ZeRO-3's / FSDP's shards in the last checkpoint, consolidated offline, are final/
        assert not (tmp_path / "straight" / "checkpoints" / "step-30" / "model").exists()  # only shards there
        exported = cli("export", str(tmp_path / "straight"), "--checkpoint", "step-30", "--out", str(tmp_path / "m"))
        assert exported.returncode == 0 and "verified: reloaded in a fresh process" in exported.stdout, exported.stderr[-3000:]
        assert _logits_diff(tmp_path / "m", tmp_path / "straight" / "final") < 1e-5

    # Ctrl-C as a terminal sends it: SIGINT to the whole process group, mid-run. The launcher and
    # workers are in a session of their own: only `gptj-tune run` gets it, and hands it on once.
    # Early (3 of 30 steps), so that a fast machine cannot finish the run before the signal lands.
    args = [*run_args(tmp_path / "cut", backend, stage), *extra]
    temp, env = own_tmpdir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(recipe), *args, "--set", "train.save_every=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)  # fmt: skip
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "checkpoint saved" in out + err
    saved = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 30, saved
    assert not list(temp.glob("gptj-tune-launcher-*")), "a stopped run leaves no launcher log behind"

    resumed = cli("run", str(recipe), *args, "--set", "train.save_every=100", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 31))
    assert max(abs(a[s] - b[s]) for s in a) < TOLERANCE
    if method == LORA:
        assert (tmp_path / "cut" / "final" / "adapter_model.safetensors").exists()
        assert _adapter_logits_diff(tmp_path / "cut", tmp_path / "straight") < 1e-4
    else:
        assert _final_logits_diff(tmp_path / "cut", tmp_path / "straight") < 1e-4


def _adapter_logits_diff(run_a, run_b) -> float:
    """Largest logit difference between two runs' final adapters, each on its run's base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = []
    with torch.no_grad():
        for run in (run_a, run_b):
            base = AutoModelForCausalLM.from_pretrained(run / "base-model")
            reference = base(input_ids=ids).logits
            out.append(PeftModel.from_pretrained(base, run / "final")(input_ids=ids).logits)
            assert (out[-1] - reference).abs().max() > 1e-3, "the adapter changed nothing"
    return (out[0] - out[1]).abs().max().item()


@pytest.mark.slow
def test_two_machines_on_loopback_complete_a_run(tmp_path, single_run):
    recipe = recipe_file(tmp_path)
    port = free_port()
    common = ["--set", f"output.dir={tmp_path / 'run'}", "--set", "distributed.backend=ddp",
              "--set", "distributed.num_machines=2", "--set", f"distributed.main_process_port={port}"]  # fmt: skip
    machines = [
        subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(recipe), *common, "--set", f"distributed.machine_rank={rank}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "machine 1 of 2" in outputs[1][0]
    ours, reference = losses(tmp_path / "run"), losses(single_run)
    assert max(abs(ours[s] - reference[s]) for s in ours) < TOLERANCE


# ------------------------------------------------------------------------------- recipe checks


@pytest.mark.parametrize(
    "text,match",
    [
        ("distributed: {backend: single, num_processes: 2}", "backend single runs one process"),
        ("distributed: {backend: deepspeed, deepspeed: {zero_stage: 2, offload_params: cpu}}", "offload_params needs zero_stage: 3"),
        ("model: {dtype: bf16}\ndistributed: {mixed_precision: fp16}", "contradicts model.dtype bf16"),
        ("distributed: {backend: ddp, deepspeed: {zero_stage: 3}}", "only apply to backend: deepspeed"),
        ("distributed: {backend: ddp, num_machines: 2, machine_rank: 2}", "machine_rank 2 must be below num_machines 2"),
        ("distributed: {backend: deepspeed, deepspeed: {config: ds.json, zero_stage: 3}}", "set either `config` or zero_stage"),
    ],
)
def test_contradictions_are_errors(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write_recipe(tmp_path / "r.yaml", text))


def test_user_deepspeed_json_gets_auto_values_from_the_recipe(tmp_path):
    from gptj_tune.train.engines import deepspeed_config

    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "overlap_comm": True},
    }))  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", (
        "train: {batch_size: 8, grad_accum: 4, max_grad_norm: 0.5}\n"
        "distributed: {backend: deepspeed, num_processes: 8, mixed_precision: bf16, deepspeed: {config: ds.json}}\n"
    )))  # fmt: skip
    config = deepspeed_config(recipe)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 * 4 * 8 and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["overlap_comm"] is True  # the user's own keys stay
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(RecipeError, match="has `optimizer`; remove it"):
        deepspeed_config(recipe)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3-offload.json"])
def test_shipped_deepspeed_jsons_fill_in(tmp_path, name):
    from conftest import RECIPES

    from gptj_tune.train.engines import deepspeed_config

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", (
        f"distributed: {{backend: deepspeed, num_processes: 4, deepspeed: {{config: {RECIPES / 'deepspeed' / name}}}}}\n"
    )))  # fmt: skip
    config = deepspeed_config(recipe)
    assert "auto" not in json.dumps(config)
    assert config["train_batch_size"] == 8 * 1 * 4


@pytest.mark.slow
def test_runs_under_an_outside_torchrun(tmp_path, single_run):
    recipe = recipe_file(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "gptj_tune", "run", str(recipe), *run_args(tmp_path / "run", "deepspeed", 2)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launching" not in result.stdout  # the workers ran the recipe themselves: no second launch
    ours, reference = losses(tmp_path / "run"), losses(single_run)
    assert max(abs(ours[s] - reference[s]) for s in ours) < TOLERANCE


@pytest.mark.slow
def test_deepspeed_hostfile_launch(tmp_path, single_run):
    """DeepSpeed's own launcher from a hostfile (one machine here: no ssh involved)."""
    (tmp_path / "hosts").write_text("# the machines of the job\nlocalhost slots=2\n")
    recipe = recipe_file(tmp_path)
    args = [*run_args(tmp_path / "run", "deepspeed", 2), "--set", "distributed.hostfile=hosts"]
    result = cli("run", str(recipe), *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ours, reference = losses(tmp_path / "run"), losses(single_run)
    assert max(abs(ours[s] - reference[s]) for s in ours) < TOLERANCE
    # DeepSpeed's launcher switches on its shared-memory all-reduce (69 MB per rank in /dev/shm,
    # which DeepSpeed never unlinks): the workers unlink it once every rank has it open.
    port = next(a.split("=")[1] for a in args if a.startswith("distributed.main_process_port="))
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"shared memory left behind: {left}"

    temp, env = own_tmpdir(tmp_path)
    (tmp_path / "hosts").write_text("localhost slots=2\nother slots=2\n")
    mismatch = cli("run", str(recipe), *args, "--force", env=env)
    assert mismatch.returncode == 2 and "lists 2 machine(s)" in mismatch.stderr + mismatch.stdout
    (tmp_path / "hosts").write_text("localhost 2\n")
    bad = cli("run", str(recipe), *args, "--force", env=env)
    assert bad.returncode == 2 and "line 1: expected `HOST slots=N`" in bad.stderr + bad.stdout
    assert not list(temp.iterdir()), "a hostfile error leaves no launcher files behind"
