"""The speed paths other than attention (test_attention.py) equal what they replace: the fused
chunked cross-entropy vs full logits, on packed rows, padding and generation; the one-kernel GELU vs
`gelu_new`; the fused LoRA add vs peft's; the CPU dropout drops at rate p, independently, and
scales exactly; 16-bit batch widths rounded up. Compiled blocks: test_compile.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SPEED_SHAPE_ARGS, load_tiny, packed_batch

from gptj_tune.model.kernels import CheapDropout, dropout_on_cpu, use_cheap_dropout, use_fused_lora
from gptj_tune.data.tokens import IGNORE
from gptj_tune.model.loss_head import LossHead, fused_linear_cross_entropy, use_loss_head
from gptj_tune.model.methods import apply_method
from gptj_tune.recipe import LoraMethod
from gptj_tune.train.step import LossPath, batch_loss, target_count

LAYERS = SPEED_SHAPE_ARGS["layers"]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("train_weight", [True, False])
def test_fused_cross_entropy_equals_full_logits(chunk, train_weight):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(150, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(501, 32, generator=g, dtype=torch.float64).requires_grad_(train_weight)
    bias = torch.randn(501, generator=g, dtype=torch.float64).requires_grad_(train_weight)
    targets = torch.randint(0, 501, (150,), generator=g)

    plain = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
    plain_grads = torch.autograd.grad(plain * 0.7, [t for t in (hidden, weight, bias) if t.requires_grad])
    fused = fused_linear_cross_entropy(hidden, weight, bias, targets, chunk)
    fused_grads = torch.autograd.grad(fused * 0.7, [t for t in (hidden, weight, bias) if t.requires_grad])
    assert abs(plain.item() - fused.item()) < 1e-6 * plain.item()
    for p, f in zip(plain_grads, fused_grads, strict=True):
        assert p.dtype == f.dtype and (p - f).abs().max() < 1e-5


@pytest.mark.parametrize("rows, chunk", [(300, 256), (300, 10_000), (40, 16)])
def test_fused_cross_entropy_under_autocast_equals_autocast_logits(rows, chunk):
    """Under bf16 autocast the fused head multiplies in bf16, as an autocast F.linear does, and hands
    back fp32 gradients: the same loss and gradients as autocast logits + cross-entropy, chunks that
    are padded to PAD_ROWS (300 rows: 256 + 44) and chunks smaller than it included."""
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 64, generator=g, requires_grad=True)
    weight = (torch.randn(3001, 64, generator=g) * 0.2).requires_grad_()
    bias = (torch.randn(3001, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, 3001, (rows,), generator=g)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = fused_linear_cross_entropy(hidden, weight, bias, targets, chunk)
            else:
                loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
        results.append((loss.float(), torch.autograd.grad(loss, [hidden, weight, bias])))
    (plain, plain_grads), (fused, fused_grads) = results
    assert abs(plain.item() - fused.item()) < 1e-4 * plain.item()
    for p, f in zip(plain_grads, fused_grads, strict=True):
        assert f.dtype == torch.float32 and (p - f).abs().max() < 2e-2 * p.abs().max()


_TARGET_COUNTS_VARY = """
import resource, torch
from transformers import GPTJConfig, GPTJForCausalLM
from gptj_tune.model.loss_head import model_loss, use_loss_head
from gptj_tune.train.memory import keep_freed_memory
keep_freed_memory()
torch.manual_seed(0)
config = GPTJConfig(vocab_size=50400, n_positions=512, n_embd=512, n_layer=1, n_head=8, rotary_dim=32)
model = GPTJForCausalLM(config)
use_loss_head(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
resident = []
for step in range(12):
    ids = torch.randint(0, 50400, (2, 512))
    labels = ids.clone()
    labels.view(-1)[: int(torch.randint(100, 500, ()))] = -100  # a different target count each step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model_loss(model, labels, input_ids=ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    resident.append(int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2**20)
print(*resident)
"""


def _cpu_has_bf16_instructions() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(not _cpu_has_bf16_instructions(), reason="this CPU has neither AVX512-BF16 nor AMX: its bf16 "
                    "products are emulated (this test's 12 steps took over 9 minutes on such a CPU), and bf16 "
                    "autocast is advised only where the CPU multiplies bf16 itself")  # fmt: skip
def test_bf16_training_memory_stays_flat_when_the_target_count_changes_every_step():
    """oneDNN (16-bit products on the CPU) keeps a plan with buffers per product shape: the head pads
    its rows so a run meets a few shapes. Unpadded, resident memory grew ~70 MiB a step here."""
    out = subprocess.run([sys.executable, "-c", _TARGET_COUNTS_VARY], capture_output=True, text=True, check=True)
    resident = [int(x) for x in out.stdout.split()]
    assert resident[-1] - resident[3] < 100, resident


def test_fused_cross_entropy_with_no_targets_is_zero_with_a_graph():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and weight.grad is not None and not weight.grad.any()


@pytest.mark.parametrize("method", ["full", "lora-with-head"])
def test_fused_loss_through_the_model_equals_plain(tiny_gptj, method):
    """The same model, the same batch: loss sum and every trainable gradient agree."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = load_tiny(tiny_gptj, "auto")
        if fused:
            assert use_loss_head(model)
        if method == "lora-with-head":
            model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=0.0, modules_to_save=["lm_head"]), False)
        assert any(isinstance(m, LossHead) for m in model.modules()) == fused
        model.train()
        batch = packed_batch(model.config.vocab_size)
        loss, targets = batch_loss(model, batch, LossPath(fused_chunk=16 if fused else None)), target_count(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), targets, grads))
    (plain, n_plain, g_plain), (fused, n_fused, g_fused) = results
    assert n_plain == n_fused == int((packed_batch(10)["labels"][:, 1:] != IGNORE).sum())
    assert abs(plain - fused) < 1e-4 * max(1.0, abs(plain))
    assert g_plain.keys() == g_fused.keys() and any("lm_head" in n for n in g_fused)
    assert max((g_plain[n] - g_fused[n]).abs().max() for n in g_plain) < 1e-5


def test_the_fused_head_still_returns_logits_outside_the_loss(tiny_gptj):
    model, _ = load_tiny(tiny_gptj, "auto")
    ids = torch.tensor([[5, 6, 7, 8]])
    before, keys = model(input_ids=ids).logits, list(model.state_dict())
    use_loss_head(model)
    after = model(input_ids=ids).logits
    assert after.shape == before.shape and torch.equal(before, after)
    assert list(model.state_dict()) == keys  # same parameters under the same names


def test_one_kernel_gelu_is_installed_at_load_and_equals_stock_gelu_new(tiny_gptj, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    ours, _ = load_tiny(tiny_gptj, "eager")
    stock = AutoModelForCausalLM.from_pretrained(tiny_gptj, attn_implementation="eager")
    assert [type(b.mlp.act).__name__ for b in ours.transformer.h] == ["OneKernelGELU"] * LAYERS
    assert all(type(b.mlp.act) is NewGELUActivation for b in stock.transformer.h)
    batch = packed_batch(ours.config.vocab_size)
    grads = []
    for model in (stock, ours):
        model.train()
        loss = batch_loss(model, batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert max((grads[0][n] - grads[1][n]).abs().max() for n in grads[0]) < 1e-5
    x = torch.linspace(-8, 8, 10_001)
    assert (F.gelu(x, approximate="tanh") - NewGELUActivation()(x)).abs().max() < 1e-6
    ours.save_pretrained(tmp_path / "saved")  # the switch is not written anywhere
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.activation_function == "gelu_new"


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_cpu_dropout_drops_at_rate_p_independently_and_scales_exactly(p):
    torch.manual_seed(0)
    x = torch.rand(1001, 1001) + 1.0  # odd size: part of the last 64-bit random draw goes unused
    x.requires_grad_(True)
    y, returned_scale = dropout_on_cpu(x, p)
    kept = y != 0
    n = x.numel()
    tolerance = 5 * (p * (1 - p) / (n / 4)) ** 0.5  # five standard deviations of a quarter's rate
    # Each 64-bit draw feeds four elements: each quarter must drop at rate p (a biased bit would show).
    for k in range(4):
        assert abs(1 - kept.flatten()[k::4].float().mean().item() - p) < tolerance
    scale = 32768 / (32768 - round(p * 32768))
    assert returned_scale == scale
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, kept * (3.0 * scale))
    # Neighbouring elements are not correlated: P(both kept) = (1-p)^2.
    pairs = (kept[:, :-1] & kept[:, 1:]).float().mean().item()
    assert abs(pairs - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5 * 2


def test_cpu_dropout_follows_the_seed_and_is_off_in_eval():
    layer = CheapDropout(0.1)
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    c = layer(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(CheapDropout(0.0)(x), x)


def test_lora_dropout_is_switched_and_training_still_learns(tiny_gptj):
    model, _ = load_tiny(tiny_gptj, "auto")
    model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=0.1), False)
    switched = use_cheap_dropout(model)
    lora_dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert lora_dropouts and all(type(m) is CheapDropout for m in lora_dropouts) and switched >= len(lora_dropouts)
    batch = packed_batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss, targets = batch_loss(model, batch), target_count(batch)
        (loss / targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() / targets)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_add_equals_peft(tiny_gptj, dropout):
    """Same weights, same seed (so the same dropout masks): the same loss and adapter gradients as
    peft's own forward, and peft's forward is still used when adapters are disabled."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = load_tiny(tiny_gptj, "auto")
        model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=dropout), False)
        for name, param in model.named_parameters():  # B starts at zero: make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        use_cheap_dropout(model)
        if fused:
            assert use_fused_lora(model) == LAYERS * 6
        model.train()
        torch.manual_seed(1)
        loss = batch_loss(model, packed_batch(model.config.vocab_size))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with model.disable_adapter():
            base = batch_loss(model, packed_batch(model.config.vocab_size))
        results.append((loss.item(), grads, base.item()))
    (plain, g_plain, base_plain), (fused, g_fused, base_fused) = results
    assert abs(plain - fused) < 1e-4 * abs(plain)
    assert max((g_plain[n] - g_fused[n]).abs().max() for n in g_plain) < 1e-5
    assert base_plain == base_fused and abs(base_plain - plain) > 1e-3


def test_fused_lora_on_a_16_bit_base_computes_in_its_dtype(tiny_gptj):
    """On a bf16 base the adapter's products run in bf16 (its fp32 weights cast for them, their
    gradients fp32), not on an fp32 copy of the input as peft does: the same loss and gradients as
    peft's fp32 adapter path within bf16 rounding, and a different computation (it can fail)."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = load_tiny(tiny_gptj, "auto")
        model = apply_method(model.to(torch.bfloat16), LoraMethod(kind="lora", r=4, dropout=0.0), False)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        if fused:
            use_fused_lora(model)
        loss = batch_loss(model.train(), packed_batch(model.config.vocab_size))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 and g.dtype == torch.float32 for n, p in model.named_parameters()
                   if p.requires_grad for g in [grads[n]])  # fmt: skip
        results.append((loss.item(), torch.cat([g.flatten() for g in grads.values()])))
    (peft_loss, peft_grads), (ours_loss, our_grads) = results
    assert abs(peft_loss - ours_loss) < 1e-2 * abs(peft_loss) and peft_loss != ours_loss
    cosine = F.cosine_similarity(peft_grads, our_grads, dim=0)
    assert cosine > 0.99 and (peft_grads - our_grads).norm() < 0.1 * peft_grads.norm(), cosine


def test_batches_rounded_up_to_a_width_multiple_give_the_same_loss(tiny_gptj):
    """With 16-bit products on a CPU, batch widths are rounded up to a multiple of 64 (few matrix
    shapes for oneDNN): the padding is its own segment and never a target, so loss and target count
    are those of the batch as wide as its longest row."""
    from gptj_tune.data.batches import Batches
    from gptj_tune.data.pack import Row

    g = torch.Generator().manual_seed(1)
    rows = []
    for parts in ([20, 17], [30, 12, 8]):  # packed rows of 37 and 50 tokens
        ids = torch.randint(3, 200, (sum(parts),), generator=g).tolist()
        labels = [IGNORE] * 4 + ids[4:]
        rows.append(Row(ids, labels, [p for n in parts for p in range(n)]))
    torch.manual_seed(0)
    model, tok = load_tiny(tiny_gptj, "auto")
    model.eval()
    seen = []
    for multiple in (1, 64):
        batch = Batches(rows, 2, tok.pad_token_id, 0, shuffle=False, width_multiple=multiple).device_batch(0)
        with torch.no_grad():
            seen.append((batch["input_ids"].shape[1], target_count(batch), float(batch_loss(model, batch))))
    (w1, n1, loss1), (w64, n64, loss64) = seen
    assert (w1, w64) == (50, 64) and n1 == n64 > 0
    assert abs(loss1 - loss64) < 1e-5 * loss1
