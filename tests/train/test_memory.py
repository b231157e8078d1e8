"""The CPU host: glibc keeps freed memory for reuse, trainable weights leave the checkpoint's
file mapping at setup (frozen ones stay, tied ones stay tied), bf16 advice only where it pays."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_gpt_neo_config

from gptj_tune.train.memory import bf16_advice, file_mapped_ranges, gpu_bf16_warning, in_file_mapping, own_trainable_weights

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and glibc: Linux only")


def test_file_mapped_ranges_keeps_file_backed_lines_only(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 rw-p 00000000 fe:00 2171488    /runs/base/model.safetensors\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
        "55d000000000-55d000400000 rw-p 00000000 00:00 0          [heap]\n"
        "7f0000400000-7f0000401000 r-xp 0003b000 fe:00 13787199   /usr/lib/libc.so.6\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0          [stack]\n"
    )
    assert file_mapped_ranges(maps) == [(0x7F0000000000, 0x7F0000100000), (0x7F0000400000, 0x7F0000401000)]
    assert file_mapped_ranges(tmp_path / "absent") == []  # not Linux: nothing seen, nothing moved


@linux_only
@pytest.mark.parametrize("family", ["gptj", "gpt_neo"])
def test_trainable_weights_leave_the_checkpoint_mapping_frozen_and_tied_ones_stay(tmp_path, family):
    """from_pretrained leaves CPU weights in a private mapping of model.safetensors (each page copied
    on its first write, in the first optimizer step). After own_trainable_weights the trainable ones
    live in process memory with the same values; frozen ones stay mapped; GPT-Neo's tied head and
    embedding are still one tensor."""
    from transformers import AutoModelForCausalLM, GPTJConfig

    torch.manual_seed(0)
    if family == "gptj":
        config = GPTJConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    else:
        config = tiny_gpt_neo_config(512, width=64, heads=4, window=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ranges = file_mapped_ranges()
    mapped = [name for name, p in model.named_parameters() if in_file_mapping(p, ranges)]
    assert mapped, "transformers no longer maps the checkpoint: own_trainable_weights has nothing to do"
    frozen = next(name for name in mapped if ".h.0." in name)
    model.get_parameter(frozen).requires_grad_(False)

    moved = own_trainable_weights(model)

    ranges = file_mapped_ranges()
    params = dict(model.named_parameters())
    assert moved == len(mapped) - 1
    assert [name for name, p in params.items() if in_file_mapping(p, ranges)] == [frozen]
    assert all(torch.equal(p, before[name]) for name, p in params.items())
    if family == "gpt_neo":
        assert model.lm_head.weight is model.transformer.wte.weight
    assert own_trainable_weights(model) == 0  # nothing left to move


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_setup_copies_off_the_mapping_the_weights_it_will_write(tmp_path, monkeypatch, method):
    """The loop's setup (CPU) calls own_trainable_weights: a full run trains no mapped weight and
    moves every one; a LoRA run moves none (its adapters are new tensors), its frozen base stays mapped."""
    from conftest import small_recipe
    from rich.console import Console

    from gptj_tune.train import loop, setup
    from gptj_tune.recipe import load_recipe

    seen = []

    def spy(model, ranges=None):
        moved = own_trainable_weights(model, ranges)
        now = file_mapped_ranges()
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        seen.append((moved, len(trainable), sum(in_file_mapping(p, now) for p in trainable), sum(in_file_mapping(p, now) for p in params)))
        return moved

    monkeypatch.setattr(setup, "own_trainable_weights", spy)
    loop.train(load_recipe(small_recipe(tmp_path, method=method, steps=2, save_every=2)), console=Console(quiet=True))
    ((moved, trainable, trainable_mapped, mapped),) = seen
    assert trainable > 0 and trainable_mapped == 0
    if method == "full":
        assert moved == trainable and mapped == 0
    else:
        assert moved == 0 and mapped > 0


_ALLOCATE_AND_FREE = """
import sys, torch
from gptj_tune.train.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return [int(x, 16) for x in line.split()[0].split("-")]

def rss_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

x = torch.ones(64 * 2**20 // 4)  # 64 MiB: over glibc's largest mmap threshold (32 MiB)
low, high = heap()
in_heap = low <= x.data_ptr() < high
before = rss_kib()
del x
print(kept, in_heap, (before - rss_kib()) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them_when_freed():
    """Plain glibc maps a 64 MiB tensor straight from the OS and gives it back on free (so the next
    one is page-faulted in again); after keep_freed_memory() it comes from the heap and stays."""
    seen = {}
    for mode in ("plain", "keep"):
        out = subprocess.run([sys.executable, "-c", _ALLOCATE_AND_FREE, mode], capture_output=True, text=True, check=True)
        kept, in_heap, released_mib = out.stdout.split()
        seen[mode] = (kept, in_heap, int(released_mib))
    assert seen["plain"][:2] == ("None", "False") and seen["plain"][2] >= 60
    assert seen["keep"][:2] == ("True", "True") and seen["keep"][2] <= 4


def test_bf16_advice_only_where_bf16_pays():
    """The setup's tip names bf16 autocast only for fp32 training of a 256+ wide model on a CPU with
    AMX or AVX-512 bf16, with the gain measured on such hardware."""
    from transformers import GPTJConfig, GPTJForCausalLM

    def model(width, dtype=torch.float32):
        config = GPTJConfig(vocab_size=32, n_positions=16, n_embd=width, n_layer=1, n_head=4, rotary_dim=8)
        return GPTJForCausalLM(config).to(dtype)

    cpu, wide = torch.device("cpu"), model(256)
    assert "distributed.mixed_precision=bf16" in bf16_advice(wide, cpu, "no", hardware="AMX")
    assert "(AVX-512 bf16)" in bf16_advice(wide, cpu, "no", hardware="AVX-512 bf16") and "1.3-1.4x" in bf16_advice(wide, cpu, "no", hardware="AVX-512 bf16")
    assert bf16_advice(wide, cpu, "no", hardware=None) is None  # AVX2 only: bf16 is emulated, slower
    assert bf16_advice(wide, cpu, "bf16", hardware="AMX") is None  # already asked for
    assert bf16_advice(wide, torch.device("cuda"), "no", hardware="AMX") is None
    assert bf16_advice(model(64), cpu, "no", hardware="AMX") is None  # too narrow to gain
    assert bf16_advice(model(256, torch.bfloat16), cpu, "no", hardware="AMX") is None  # 16-bit weights


def test_bf16_on_a_gpu_older_than_ampere_is_warned_with_the_float16_alternative():
    """A T4 or V100 has no bf16 arithmetic: a recipe computing in bf16 there is told so at setup;
    an Ampere or newer GPU, fp32 or fp16 compute, and CPUs are not."""
    cuda = torch.device("cuda", 0)
    warning = gpu_bf16_warning(True, cuda, ("Tesla T4", (7, 5)))
    assert warning.startswith("the Tesla T4 (compute capability 7.5) has no bf16 arithmetic, and this recipe computes in bf16")
    assert "model.dtype: float32 with distributed.mixed_precision: fp16" in warning
    assert gpu_bf16_warning(True, cuda, ("Tesla V100-SXM2-16GB", (7, 0))) is not None
    assert gpu_bf16_warning(True, cuda, ("NVIDIA A10G", (8, 6))) is None
    assert gpu_bf16_warning(False, cuda, ("Tesla T4", (7, 5))) is None
    assert gpu_bf16_warning(True, torch.device("cpu")) is None


_UNDER_A_MEMORY_LIMIT = """
import resource, sys
import torch, transformers, peft  # noqa: F401  (the large libraries mapped before the limit is measured)
from gptj_tune.cli import main
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = ["gptj-tune", *sys.argv[1:]]
main()
"""

# Eager attention keeps fp32 scores of rows x 64 heads x 2048 x 2048 positions: 1 GiB a row, in one tensor.
_TOO_BIG = """\
model:
  name_or_path: tiny-gptj
  tiny: {{layers: 2, width: 512, heads: 64, rotary_dim: 8, context: 2048}}
  attn_implementation: eager
method: {{kind: full}}
data:
  sources: [{{format: synthetic, count: {count}}}]
  template: plain
  max_length: 2048
train: {{max_steps: 2, batch_size: {rows}, warmup_steps: 0, compile: false}}
output: {{dir: {out}}}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory limit is read from /proc (Linux)")
def test_a_step_that_runs_out_of_memory_is_one_message_with_what_to_change(tmp_path):
    """A real out-of-memory: the run's process limited to 4 GiB more address space than its
    libraries take, and a step whose attention scores need 8 GiB. One line saying where, how much,
    the plan's estimate and what to change; exit 1, failed.json, no traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_TOO_BIG.format(out=tmp_path / "run", rows=8, count=2000))
    result = subprocess.run([sys.executable, "-c", _UNDER_A_MEMORY_LIMIT, "run", str(recipe)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error: "):].replace("\n", " ")
    assert message.startswith("error: out of memory on the CPU (a memory limit of this process, such as `ulimit -v`) "
                              "in step 1 (8 rows of up to 2048 tokens a micro-batch): it asked for 8.00 GiB more; "
                              "`gptj-tune plan` estimated ")  # fmt: skip
    assert "To fit: lower train.batch_size (8; raise train.grad_accum" in message
    assert "turn on model.gradient_checkpointing" in message and "No checkpoint was saved before it" in message
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["step"] == 1 and failed["message"].startswith("out of memory on the CPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it on the GPU machine)")
def test_a_step_that_runs_out_of_cuda_memory_is_one_message_with_what_to_change(tmp_path):
    """The same on a GPU: 200 rows a micro-batch need 200 GiB of attention scores in one tensor."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_TOO_BIG.format(out=tmp_path / "run", rows=200, count=30000))
    result = subprocess.run([sys.executable, "-m", "gptj_tune", "run", str(recipe)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error: "):].replace("\n", " ")
    name = torch.cuda.get_device_properties(0).name
    assert message.startswith("error: out of memory on the GPU (cuda:0) in step 1 (200 rows of up to 2048 tokens"), message
    assert f"GiB were allocated at the peak, of the {name}'s " in message and "To fit: lower train.batch_size (200;" in message
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["step"] == 1
