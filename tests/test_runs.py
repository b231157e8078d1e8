"""`gptj-tune runs` and `gptj-tune compare` on real runs: finished, running, killed."""

from __future__ import annotations

import signal

import pytest
from conftest import cli, small_recipe, start_run_until


@pytest.mark.slow
def test_runs_reports_finished_running_and_killed_runs_and_compare_names_the_differences(tmp_path):
    runs = tmp_path / "runs"
    done = small_recipe(tmp_path, steps=6, save_every=3, out=runs / "done", name="done.yaml")
    assert cli("run", str(done)).returncode == 0
    killed = small_recipe(tmp_path, steps=400, save_every=5, lr=1e-3, out=runs / "killed", name="killed.yaml")
    proc = start_run_until(killed, runs / "killed" / "checkpoints" / "step-5")
    try:
        listed = cli("runs", str(runs))
        assert listed.returncode == 0, listed.stderr
        assert "running (step" in listed.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    listed = cli("runs", str(runs))
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.startswith("│")}
    assert "finished" in rows["done"] and "lora" in rows["done"] and "tiny-gptj" in rows["done"]
    assert "interrupted at step" in rows["killed"] and "resumable from step-" in rows["killed"]

    compared = cli("compare", str(runs / "done"), str(runs / "killed"), "--out", str(tmp_path / "c.png"))
    assert compared.returncode == 0, compared.stderr
    keys = {line.split("│")[1].strip() for line in compared.stdout.splitlines() if line.startswith("│")}
    assert {"train.lr", "train.max_steps", "train.save_every"} <= keys and "output.dir" not in keys and "train.seed" not in keys
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    refused = cli("compare", str(runs / "done"), str(tmp_path))
    assert refused.returncode == 2 and "is not a run directory" in refused.stderr
