"""`gptj-tune data prepare` and `data show` on real Alpaca records, and a run that reads the store
they built."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import cli, write_recipe

RECIPE = """\
model:
  name_or_path: tiny-gptj
  tiny: {{layers: 2, width: 64, heads: 4, rotary_dim: 8, context: 256}}
  tokenizer: {tokenizer}
method:
  kind: lora
data:
  sources:
    - format: alpaca
      path: {alpaca}
      limit: 300
  max_length: 256
  eval_fraction: 0.1
  on_bad_record: skip
  cache_dir: {cache}
train:
  max_steps: 2
  batch_size: 2
  save_every: 100
eval:
  generate_samples: 0
output:
  dir: {out}
"""


def test_prepare_prints_the_statistics_and_a_run_then_reads_the_same_store(tmp_path, shared_data):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(
        tokenizer=shared_data / "gpt2-tokenizer", alpaca=shared_data / "alpaca" / "alpaca_2k.json",
        cache=tmp_path / "cache", out=tmp_path / "run"))  # fmt: skip
    r = cli("data", "prepare", str(recipe), "--plot", str(tmp_path / "lengths.png"))
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    [store] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    meta = json.loads((store / "meta.json").read_text())
    assert "built now" in out and str(store) in out.replace("\n", "")
    assert meta["sources"][0]["records"] == 300 and meta["train_stats"]["examples"] == 270
    assert "270" in out and "held out" in out and "padding" in out
    assert "1 malformed records skipped" in out and "alpaca_2k.json:1422: field `output` is empty" in out.replace("\n", "")
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = cli("data", "prepare", str(recipe))
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0 and "already prepared (cache hit)" in out, err

    r = cli("run", str(recipe))
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    assert "prepared earlier, read from" in out and str(store) in out.replace("\n", "")


def test_gptj_6b_data_is_prepared_offline_with_a_local_tokenizer(tmp_path, shared_data):
    """On a machine without the 6B weights or the hub (the suite runs offline): GPT-J-6B's special
    tokens are known, so its data prepares with `model.tokenizer` alone, into the store a run with
    the same tokenizer reads. Another hub model's config is still needed, and its error says so."""
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(
        tokenizer=shared_data / "gpt2-tokenizer", alpaca=shared_data / "alpaca" / "alpaca_2k.json",
        cache=tmp_path / "cache", out=tmp_path / "run"))  # fmt: skip
    big = ["--set", "model.name_or_path=EleutherAI/gpt-j-6b", "--set", "model.tiny=null", "--set", "model.revision=float16"]
    r = cli("data", "prepare", str(recipe), *big)
    assert r.returncode == 0 and "built now" in r.stdout, r.stderr
    r = cli("data", "prepare", str(recipe))  # the tiny model with the same tokenizer: the same tokens
    assert r.returncode == 0 and "already prepared (cache hit)" in r.stdout, r.stderr
    r = cli("data", "prepare", str(recipe), "--set", "model.name_or_path=EleutherAI/gpt-neo-1.3B", "--set", "model.tiny=null")
    assert r.returncode == 2 and "'EleutherAI/gpt-neo-1.3B' is not a local folder" in r.stderr and "Traceback" not in r.stderr


def test_a_signal_during_prepare_stops_it_in_one_line_and_leaves_no_half_store(tmp_path, shared_data):
    """SIGTERM (a cancelled batch job) while the 52k Alpaca records are being prepared: exit 130,
    one line, and no temporary folder or build lock left in the cache, so the next prepare builds at once."""
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(
        tokenizer=shared_data / "gpt2-tokenizer", alpaca=shared_data / "alpaca" / "alpaca_data.json",
        cache=tmp_path / "cache", out=tmp_path / "run").replace("      limit: 300\n", ""))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "data", "prepare", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cache").glob("*.building")):  # the build has begun
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert err.strip() == "stopped by SIGTERM; nothing is left half-written" and "store:" not in out, (err[-3000:], out[-1000:])
    assert list((tmp_path / "cache").iterdir()) == []


def test_show_decodes_rows_with_targets_and_boundaries(tmp_path, shared_data):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(
        tokenizer=shared_data / "gpt2-tokenizer", alpaca=shared_data / "alpaca" / "alpaca_2k.json",
        cache=tmp_path / "cache", out=tmp_path / "run"))  # fmt: skip
    r = cli("data", "show", str(recipe), "-n", "2", "--start", "100")  # the last rows: several short examples each
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    assert out.count("row 100:") == 1 and out.count("row 101:") == 1 and "row 102:" not in out
    assert "── example 2:" in out and "### Instruction:" in out and "### Response:" in out and "<|endoftext|>" in out
    r = cli("data", "show", str(recipe), "--split", "test")
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "expected train or eval" in err


def test_targets_are_the_highlighted_text(gpt2_tokenizer):
    """What `data show` styles as targets is exactly the response and its EOS."""
    from gptj_tune.data.templates import BUILTIN_TEMPLATES
    from gptj_tune.data.tokens import IGNORE, tokenize_instructions
    from gptj_tune.data_commands import _highlighted

    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    [example], _ = tokenize_instructions([record], gpt2_tokenizer, BUILTIN_TEMPLATES["alpaca"], 256, False, "truncate")
    text = _highlighted(gpt2_tokenizer, np.asarray(example.input_ids), np.asarray(example.labels) != IGNORE, 0)
    styled = {str(span.style): text.plain[span.start : span.end] for span in text.spans}
    assert styled["bold green"] == "Blue.<|endoftext|>" and styled["dim"].endswith("### Response:\n")
