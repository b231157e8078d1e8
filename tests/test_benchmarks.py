"""The training-throughput harness runs every engine on the same work and writes valid JSON.
(It measures speed; this only checks that it runs and that the engines really did the same work.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_train_throughput_harness_runs_every_engine_on_the_same_tokens(tmp_path, shared_data):
    out = tmp_path / "tt.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--records", "16", "--max-length", "128",
           "--mixed-precision", "bf16", "--data-dir", str(shared_data), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
    assert engines["trl-best"]["padding_efficiency"] == 1.0  # padding-free packing
    assert engines["hf-trainer"]["padding_efficiency"] < 0.95  # per-batch padding
