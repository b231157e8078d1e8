"""What the two-process tests share (test_distributed.py, test_launch.py): a tiny recipe, the
`--set` arguments of a multi-process run, a temp dir of the test's own, the losses a run logged."""

from __future__ import annotations

import json
import os
import socket

from conftest import write_recipe

RECIPE = """\
model:
  name_or_path: tiny-gptj
  tiny: {{layers: 2, width: 64, heads: 4, rotary_dim: 8}}
method: {method}
data:
  sources: [{{format: synthetic, count: 600}}]
  template: plain
  max_length: 128
train: {{lr: 3.0e-3, max_steps: {steps}, batch_size: 2, warmup_steps: 2, log_every: 4, save_every: 6, keep_last: 10, seed: 7}}
"""
FULL = "{kind: full}"
LORA = "{kind: lora, dropout: 0.1}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_file(tmp_path, method=FULL, steps=12, name="r.yaml"):
    return write_recipe(tmp_path / name, RECIPE.format(method=method, steps=steps))


def run_args(out, backend=None, stage=None, processes=2):
    args = ["--set", f"output.dir={out}"]
    if backend:
        args += ["--set", f"distributed.backend={backend}", "--set", f"distributed.num_processes={processes}",
                 "--set", f"distributed.main_process_port={free_port()}"]  # fmt: skip
    if stage:
        args += ["--set", f"distributed.deepspeed.zero_stage={stage}"]
    return args


def own_tmpdir(tmp_path):
    """A TMPDIR of the test's own, and the environment that points a process at it: what the launch
    leaves in its temp dir can then be checked."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    return temp, {**os.environ, "TMPDIR": str(temp)}


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}
