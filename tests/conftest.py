"""Shared fixtures: offline environment, the real data under ../shared/data, small recipes."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# What `gptj-tune` sets before it imports transformers (quiet.py), set before any test module
# imports it: transformers reads it once, at import, and would draw its save/load progress bars
# into the stderr of the commands the tests run in this process.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True, scope="session")
def _offline(tmp_path_factory):
    """No network, and caches in a temp dir, for every test and every subprocess it starts."""
    cache = tmp_path_factory.mktemp("hf-cache")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),  # train.compile's kernels
        "GPTJ_TUNE_DATA_CACHE": str(cache / "gptj-tune-data"),  # token stores (data/cache.py)
        "NETRC": str(cache / "netrc"),  # none: a developer's `wandb login` does not send test runs online
    }.items():
        os.environ[key] = value
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):  # the trackers log to files
        os.environ.pop(key, None)
    yield


def _find_shared_data() -> Path | None:
    candidates = [os.environ.get("GPTJ_TUNE_SHARED_DATA"), REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "README.md").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skip with a reason when absent, but fail under CI=true (CI always has it)."""
    found = _find_shared_data()
    if found is None:
        message = (
            "../shared/data not found (the real Alpaca/Dolly/GPT-2 tokenizer files); "
            "set GPTJ_TUNE_SHARED_DATA to its path"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " -- CI must have it")
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data):
    from gptj_tune.model.load import load_tokenizer
    from gptj_tune.recipe import ModelSection

    path = str(shared_data / "gpt2-tokenizer")
    tok = load_tokenizer(path, path, ModelSection())
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = tok.eos_token
    return tok


def file_contents(folder: Path) -> dict:
    """Every file under `folder`, path relative to it -> bytes: to show a command left a folder untouched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# A recipe that trains in a few seconds: tiny tiny-gptj, few steps.
SMALL_RECIPE = """\
model:
  name_or_path: tiny-gptj
  tiny: {{layers: 2, width: 64, heads: 4, rotary_dim: 8}}
method:
  kind: {method}
  {method_extra}
data:
  sources:
    - format: synthetic
      count: 600
  template: plain
  max_length: 128
train:
  lr: {lr}
  max_steps: {steps}
  batch_size: 4
  warmup_steps: 2
  log_every: 5
  save_every: {save_every}
  keep_last: 10
  seed: 7
output:
  dir: {out}
"""


def small_recipe(tmp_path: Path, method="lora", steps=20, save_every=10, lr=3e-3, out=None, name="r.yaml",
                 method_extra: str | None = None) -> Path:  # fmt: skip
    """SMALL_RECIPE written to tmp_path/name; `method_extra`: more `method` keys (default: LoRA dropout 0.1)."""
    if method_extra is None:
        method_extra = "dropout: 0.1" if method == "lora" else ""
    text = SMALL_RECIPE.format(
        method=method, method_extra=method_extra, steps=steps, save_every=save_every, lr=lr, out=out or tmp_path / "run"
    )
    return write_recipe(tmp_path / name, text)


def tiny_gpt_neo_config(vocab_size: int, width: int, heads: int, window: int, positions: int = 64, **extra):
    """A two-layer GPT-Neo config with one global and one local (sliding-window) attention layer,
    GPT-Neo's own alternation."""
    from transformers import GPTNeoConfig

    return GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=positions, hidden_size=width, num_layers=2,
                        num_heads=heads, attention_types=[[["global", "local"], 1]], window_size=window, **extra)  # fmt: skip


def save_tiny_gpt_neo(out: Path, tokenizer) -> Path:
    """A two-layer GPT-Neo (width 64, 4 heads, a 32-token local window, 256 positions) around
    `tokenizer`, seeded, saved with it like a hub checkpoint."""
    from transformers import GPTNeoForCausalLM

    config = tiny_gpt_neo_config(len(tokenizer), width=64, heads=4, window=32, positions=256,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPTNeoForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The tiny GPT-J the speed-path tests (model/test_kernels.py, test_attention.py, test_compile.py) compare against stock code.
SPEED_SHAPE_ARGS = dict(layers=2, width=64, heads=4, rotary_dim=8)


@pytest.fixture(scope="module")
def tiny_gptj(tmp_path_factory) -> Path:
    """A saved tiny GPT-J (SPEED_SHAPE_ARGS), built once per test module."""
    from gptj_tune.model.load import build_tiny_gptj
    from gptj_tune.recipe import ModelSection, TinyModelSection

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_gptj(ModelSection(tiny=TinyModelSection(**SPEED_SHAPE_ARGS)), out)
    return out


def load_tiny(path, attn: str, dtype: str = "float32"):
    """The saved tiny GPT-J loaded as gptj-tune loads models, under `attn` (model.attn_implementation)."""
    from gptj_tune.model.load import load_model_and_tokenizer
    from gptj_tune.recipe import ModelSection, TinyModelSection

    section = ModelSection(tiny=TinyModelSection(**SPEED_SHAPE_ARGS), attn_implementation=attn, dtype=dtype)
    return load_model_and_tokenizer(section, str(path))


def packed_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed rows of 64 tokens: the first packs three examples, the second two and a padding
    tail; the first 5 tokens of each row are prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[20, 30, 14], [40, 16, 8]]
    ids = torch.randint(3, vocab, (2, 64), generator=g)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 56:] = -100  # the padding tail
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def can_compile() -> bool:
    """Whether torch.compile can build CPU kernels here (train.compile's tests need a C++ compiler)."""
    from gptj_tune.model.compile import CompileUnavailable, check_can_compile

    try:
        check_can_compile(torch.device("cpu"))
    except CompileUnavailable:
        return False
    return True


# Settings a fresh process must see: a run that launches workers, compiles, or measures its own
# memory (this process's heap, kept by earlier in-process runs, would hide its peak).
_NEEDS_OWN_PROCESS = ("distributed", "compile: true", "train.compile", "keep_freed_memory")


def cli(*args: str, timeout: int = 600, own_process: bool | None = None, **kwargs):
    """Run the real `gptj-tune` app and return (returncode, stdout, stderr) like subprocess.run.

    In this process (through typer's runner, the same app `main` runs) unless the command needs a
    process of its own: a new Python process pays ~3 s of imports (torch, transformers, peft), and
    the suite runs the CLI about 60 times. Runs with a `distributed` section, `train.compile`, a
    memory measurement, or `env`/`cwd` arguments get a subprocess, as do callers that ask.
    """
    import subprocess

    if own_process is None:
        own_process = bool(set(kwargs) - {"input"}) or any(_needs_own_process(a) for a in args)
    if own_process:
        return subprocess.run(
            [sys.executable, "-m", "gptj_tune", *args], capture_output=True, text=True, timeout=timeout, **kwargs
        )
    return _cli_in_process(list(args), kwargs.get("input"))


def start_run_until(recipe: Path, checkpoint: Path, timeout: float = 300):
    """`gptj-tune run RECIPE` started in a process of its own, returned once `checkpoint` exists (or
    after `timeout` s): a live run to test against; the caller kills it."""
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "gptj_tune", "run", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    return proc


def _needs_own_process(arg: str) -> bool:
    """Whether the argument, or the recipe file it names, asks for any of _NEEDS_OWN_PROCESS."""
    path = Path(arg)
    recipe = path.read_text(errors="replace") if path.suffix in (".yaml", ".yml") and path.is_file() else ""
    return any(key in arg or key in recipe for key in _NEEDS_OWN_PROCESS)


@functools.cache
def _quiet_libraries_once() -> None:
    """What `main` sets up before the app, once per session (it adds a logging filter each call)."""
    from gptj_tune.cli import quiet_libraries

    quiet_libraries()
    if "transformers" in sys.modules:  # imported before the variable was read: as a fresh process has it
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _cli_in_process(args: list[str], input: str | None):
    import subprocess
    import traceback

    from typer.testing import CliRunner

    from gptj_tune.cli import app, normalize_argv

    _quiet_libraries_once()
    result = CliRunner().invoke(app, normalize_argv(args), input=input, prog_name="gptj-tune")
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What a process would print on an uncaught exception, and its exit status.
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["gptj-tune", *args], code, result.stdout, stderr)
