"""Hostile input, seeded (GPTJ_TUNE_FUZZ_SEED, default 2026): 240 broken recipes and 120 broken data
files through `gptj-tune run`. Each must end with exit 2 and one message, no traceback, and leave
nothing in the run directory beyond what the README allows (a broken recipe: nothing at all; broken
data: the frozen recipe.yaml and the built tiny base model)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import cli
from tests.fuzz import STRICT_TEMPLATE, broken_data, broken_recipes

SEED = int(os.environ.get("GPTJ_TUNE_FUZZ_SEED", "2026"))


def _one_message(result) -> str:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}: {text[-2000:]}"
    assert result.stderr.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr[-2000:]
    return result.stderr


def test_broken_recipes_get_one_message_and_exit_2_and_write_nothing(tmp_path):
    cases = broken_recipes(SEED, 240, str(tmp_path / "runs"))
    for i, (kind, contents) in enumerate(cases):
        path = tmp_path / f"recipe-{i}.yaml"
        path.write_bytes(contents)
        result = cli("run", str(path), own_process=False)
        try:
            message = _one_message(result)
        except AssertionError as e:
            raise AssertionError(f"seed {SEED}, case {i} ({kind}):\n{contents[:600]!r}\n{e}") from None
        assert len(message) < 4000, (i, kind, message)
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))[:10]
    assert len({kind for kind, _ in cases}) == 10


ALLOWED_AFTER_A_DATA_ERROR = {"recipe.yaml", "base-model"}

RECIPE = """\
model:
  name_or_path: tiny-gptj
  tiny: {{layers: 1, width: 32, heads: 2, rotary_dim: 8}}
data:
  sources: [{source}]
  max_length: 64
  on_bad_record: {policy}
  chat_template: {template}
train: {{max_steps: 2, batch_size: 2}}
output: {{dir: {out}}}
"""


@pytest.mark.slow
def test_broken_data_files_get_one_message_naming_the_file_and_exit_2(tmp_path):
    cases = broken_data(SEED, 120)
    for i, (kind, form, contents, policy) in enumerate(cases):
        suffix = {"alpaca-json": ".json", "text": ".txt", "alpaca-gz": ".jsonl.gz", "alpaca-zst": ".jsonl.zst", "alpaca-csv": ".csv",
                  "alpaca-parquet": ".parquet"}.get(form, ".jsonl")  # fmt: skip
        data = tmp_path / f"data-{i}{suffix}"
        data.write_bytes(contents)
        source = f"{{format: {form.split('-')[0]}, path: {data}}}"
        recipe = tmp_path / f"r-{i}.yaml"
        template = json.dumps(STRICT_TEMPLATE) if form == "chat-strict" else "gptj-chat"
        recipe.write_text(RECIPE.format(source=source, policy=policy, out=tmp_path / f"run-{i}", template=template))
        result = cli("run", str(recipe), own_process=False)
        where = f"seed {SEED}, case {i} ({kind}, {form}, on_bad_record {policy}): {contents[:300]!r}"
        try:
            message = _one_message(result)
        except AssertionError as e:
            raise AssertionError(f"{where}\n{e}") from None
        assert data.name in message, f"{where}\n{message}"
        left = {p.name for p in (tmp_path / f"run-{i}").iterdir()} if (tmp_path / f"run-{i}").exists() else set()
        assert left <= ALLOWED_AFTER_A_DATA_ERROR, f"{where}: {left}"
    assert len({kind for kind, *_ in cases}) == 25
