"""The first five losses of a fixed tiny run, pinned (as torchtune pins its recipes' first losses):
any silent change to the math (model, attention, loss head, optimizer, schedule, data order, init)
moves them. Measured on a 2-core AMD EPYC (fp32, 2 threads) at fdb9115, before the package split
of issue 25, and unchanged by it; CPUs that sum in another order differ by ~1e-7 relative."""

from __future__ import annotations

import json

import pytest
from conftest import small_recipe
from rich.console import Console

from gptj_tune.recipe import load_recipe
from gptj_tune.train.loop import train

PINNED = {
    "lora": [6.559458488965556, 6.347385890047315, 6.213933944702148, 6.110847896999783, 5.833220966045673],
    "full": [6.559458488965556, 6.099700497909331, 5.6106038093566895, 5.286115010579427, 4.687772780198317],
}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_first_five_losses_of_a_fixed_tiny_run(tmp_path, method):
    train(load_recipe(small_recipe(tmp_path, method=method, steps=5, save_every=5)), console=Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(PINNED[method], rel=1e-6, abs=1e-6)
