"""No route to the hub: one line at once, not a minute of huggingface_hub's retries."""

from __future__ import annotations

import os

from conftest import cli, write_recipe


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", f"model:\n  name_or_path: EleutherAI/gpt-j-6b\noutput:\n  dir: {tmp_path / 'run'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: what a machine without a route to the hub sees
    result = cli("run", str(recipe), env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Retrying" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert "could not be reached from this machine within 3 s, so only the local cache was looked in" in result.stderr.replace("\n", " ")
    assert "hf download EleutherAI/gpt-j-6b" in result.stderr.replace("\n", " ")
