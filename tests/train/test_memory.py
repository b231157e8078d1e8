"""The CPU host: glibc keeps freed memory for reuse, trainable weights leave the checkpoint's
file mapping at setup (frozen ones stay, tied ones stay tied), bf16 advice only where it pays."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_gpt_neo_config

from gptj_tune.train.memory import bf16_advice, file_mapped_ranges, in_file_mapping, own_trainable_weights

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
