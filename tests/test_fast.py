"""The speed paths equal what they replace: SDPA attention vs transformers' eager GPT-J attention,
the fused chunked cross-entropy vs full logits, on packed rows, padding and generation; the
one-kernel GELU vs `gelu_new`; the CPU dropout drops at rate p, independently, and scales exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import can_compile, tiny_gpt_neo_config

from gptj_tune.errors import ModelError, RecipeError
from gptj_tune.fast import (
    IGNORE,
    CheapDropout,
    LossHead,
    Segments,
    VarlenKernel,
    _segmented_attention,
    compile_blocks,
    dropout_on_cpu,
    fused_linear_cross_entropy,
    loss_from_head,
    mark_segments,
    use_cheap_dropout,
    use_fused_lora,
    use_loss_head,
    use_sdpa_attention,
    varlen_kernel,
)
from gptj_tune.methods import apply_method
from gptj_tune.models import (
    block_causal_mask,
    build_tiny_gptj,
    load_model_and_tokenizer,
)
from gptj_tune.recipe import LoraMethod, ModelSection, Recipe, TinyModelSection
from gptj_tune.step import LossPath, batch_loss, target_count

SHAPE = TinyModelSection(layers=2, width=64, heads=4, rotary_dim=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_gptj(ModelSection(tiny=SHAPE), out)
    return out


def load(path, attn, dtype="float32"):
    model, tok = load_model_and_tokenizer(ModelSection(tiny=SHAPE, attn_implementation=attn, dtype=dtype), str(path))
    return model, tok


def packed_batch(vocab: int, seed: int = 0):
    """Two rows; the first packs three examples, the second two and a padding tail."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[20, 30, 14], [40, 16, 8]]
    ids = torch.randint(3, vocab, (2, 64), generator=g)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[1, 56:] = IGNORE  # the padding tail
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def test_sdpa_is_used_and_matches_eager_on_packed_rows(tiny):
    eager, _ = load(tiny, "eager")
    sdpa, _ = load(tiny, "auto")
    assert type(sdpa.transformer.h[0].attn).__name__ == "GPTJSdpaAttention"
    assert type(eager.transformer.h[0].attn).__name__ == "GPTJAttention"
    batch = packed_batch(sdpa.config.vocab_size)
    mask = block_causal_mask(batch["position_ids"], torch.float32)
    outs = {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        model.train()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        outs[name] = (logits.detach(), grads)
    assert (outs["eager"][0] - outs["sdpa"][0]).abs().max() < 1e-5
    assert max((outs["eager"][1][n] - outs["sdpa"][1][n]).abs().max() for n in outs["eager"][1]) < 1e-5
    # Without the packing mask SDPA would let examples see each other: the mask really is honoured.
    leaky = sdpa(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.detach()
    assert (leaky - outs["sdpa"][0]).abs().max() > 1e-3


def test_segmented_attention_equals_the_masked_row_and_ignores_the_mask(tiny):
    """On CPU the step runs attention one packed example at a time: the same loss and gradients as
    the whole row under the block-causal mask, and with the segments set the mask is not what keeps
    examples apart (a mask that lets every token see every other changes nothing)."""
    batch = packed_batch(512)
    results = {}
    for name in ("masked", "segmented", "segmented-open-mask"):
        model, _ = load(tiny, "auto")
        use_loss_head(model)
        model.train()
        if name == "masked":
            loss = batch_loss(model, batch, LossPath(fused_chunk=16))
        else:  # `always`: these rows are too short for the per-example calls to pay in a run
            positions = batch["position_ids"].clone()
            mark_segments(positions, always=True)
            mask = block_causal_mask(positions, torch.float32)
            if name == "segmented-open-mask":
                mask = torch.zeros(2, 1, 64, 64)  # every token sees every token, also the future
            with loss_from_head(batch["labels"], 16):
                loss = model(input_ids=batch["input_ids"], position_ids=positions, attention_mask=mask).logits
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    base_loss, base_grads = results["masked"]
    for name in ("segmented", "segmented-open-mask"):
        loss, grads = results[name]
        assert abs(loss - base_loss) < 1e-5 * abs(base_loss), name
        assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5, name


def test_a_step_runs_attention_per_example_only_where_it_pays(tiny, monkeypatch):
    """512-token rows of 128-token examples: one attention call per example in every layer; the
    same step on short rows, or on rows of tiny examples, keeps the masked call."""
    import gptj_tune.fast as fast

    calls = []
    monkeypatch.setattr(fast, "_segmented_attention", lambda *a, **k: calls.append(1) or segmented(*a, **k))
    segmented = _segmented_attention
    model, _ = load(tiny, "auto")
    model.train()

    def batch(width, example):
        positions = torch.arange(width).remainder(example)[None].repeat(2, 1)
        ids = torch.randint(3, model.config.vocab_size, (2, width))
        return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}

    for width, example, segments in [(512, 128, True), (512, 16, False), (128, 128, False)]:
        calls.clear()
        batch_loss(model, batch(width, example), LossPath(segmented=True)).backward()
        assert len(calls) == (SHAPE.layers if segments else 0), (width, example)
    calls.clear()
    batch_loss(model, batch(512, 128), LossPath(segmented=False)).backward()
    assert not calls


def test_checkpointed_blocks_recompute_per_example_too(tiny, monkeypatch):
    """With gradient checkpointing, backward recomputes each block with the inputs forward had: the
    packed examples travel on the position ids, so the recomputation runs per example too (on a
    GPU: the same variable-length kernel) and gives the masked row's loss and gradients. (Had it
    taken the masked call, torch's checkpoint would refuse: a different number of saved tensors.)"""
    import gptj_tune.fast as fast

    calls = []
    monkeypatch.setattr(fast, "_segmented_attention", lambda *a, **k: calls.append(1) or segmented(*a, **k))
    segmented = _segmented_attention
    positions = torch.arange(512).remainder(128)[None].repeat(2, 1)  # rows where per-example pays
    ids = torch.randint(3, 500, (2, 512), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("masked", "per example"):
        batch = {"input_ids": ids, "position_ids": positions.clone(), "labels": ids.clone()}
        model, _ = load(tiny, "auto")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls.clear()
        loss = batch_loss(model, batch, LossPath(segmented=name != "masked"))
        loss.backward()
        results[name] = (len(calls), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (masked_calls, base_loss, base_grads), (calls_made, loss, grads) = results["masked"], results["per example"]
    assert (masked_calls, calls_made) == (0, 2 * SHAPE.layers)  # forward and recomputation
    assert abs(loss - base_loss) < 1e-5 * abs(base_loss)
    assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5


def test_segments_follow_the_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    segments = Segments(positions)
    assert segments.rows == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 7), (7, 9)]]
    # for a variable-length kernel: the rows laid end to end, every example's start, then the total
    assert segments.cu_seqlens(torch.device("cpu")).tolist() == [0, 3, 5, 9, 15, 16, 18] and segments.longest == 6


def test_loss_path_of_a_recipe_and_its_model(tiny):
    output = {"dir": "unused"}
    assert LossPath.of(Recipe.model_validate({"output": output})).segmented
    checkpointed = {"gradient_checkpointing": True}
    assert LossPath.of(Recipe.model_validate({"model": checkpointed, "output": output})).segmented  # see above
    compiled = {"compile": True}
    assert not LossPath.of(Recipe.model_validate({"train": compiled, "output": output})).segmented
    flash = Recipe.model_validate({"model": {"attn_implementation": "flash_attention_2"}, "output": output})
    gptj, _ = load(tiny, "auto")
    assert LossPath.of(flash, gptj) == LossPath(fused_chunk=2048, varlen=False, segmented=True)  # GPT-J's is ours
    # transformers' own FlashAttention-2 (here: GPT-Neo's) attends across packed examples: refused
    from transformers import GPTNeoForCausalLM

    neo = GPTNeoForCausalLM(tiny_gpt_neo_config(vocab_size=64, width=32, heads=2, window=8))
    with pytest.raises(RecipeError, match="flash_attention_2 with data.packing: transformers' FlashAttention-2 for gpt_neo "
                                          "ignores the boundaries.*use `auto`.*data.packing: false"):  # fmt: skip
        LossPath.of(flash, neo)
    unpacked = flash.model_copy(update={"data": flash.data.model_copy(update={"packing": False})})
    assert LossPath.of(unpacked, neo) == LossPath(fused_chunk=2048, varlen=True, segmented=False)  # no mask for it


class ReferenceVarlen(VarlenKernel):
    """A plain causal attention per example over the rows laid end to end: what a GPU's
    variable-length FlashAttention computes, in fp32 on a CPU."""

    def __init__(self):
        super().__init__(self.attend, dropout=False)
        self.calls = []

    def takes(self, query, dropout_p):
        return dropout_p == 0.0

    def attend(self, q, k, v, cu, longest, dropout_p):
        self.calls.append((cu.tolist(), longest, q.shape))
        out = torch.empty_like(q)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            part = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, head_dim)
            out[start:end] = F.scaled_dot_product_attention(*part, is_causal=True)[0].transpose(0, 1)
        return out


def test_varlen_kernel_path_equals_the_masked_row(tiny, monkeypatch):
    """On a GPU a packed batch's attention is one variable-length kernel call per layer over the
    rows laid end to end. The reshaping around the kernel and the example boundaries it gets give
    the masked row's loss and gradients (here with a reference kernel on the CPU; the real kernel
    on a GPU: test_varlen_kernel_on_a_gpu)."""
    import gptj_tune.fast as fast

    batch = packed_batch(512)
    kernel = ReferenceVarlen()
    results = {}
    for name in ("masked", "varlen"):
        model, _ = load(tiny, "auto")
        model.train()
        if name == "varlen":  # (on a GPU a batch always takes the segments; on a CPU where it pays)
            monkeypatch.setattr(fast, "varlen_kernel", lambda device, source: kernel)
            monkeypatch.setattr(Segments, "MIN_WIDTH", 0)
            monkeypatch.setattr(Segments, "MIN_MEAN_LENGTH", 0)
        loss = batch_loss(model, batch, LossPath(segmented=name == "varlen"))
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert kernel.calls == [([0, 20, 50, 64, 104, 120, 128], 40, (128, 4, 16))] * SHAPE.layers
    (base_loss, base_grads), (loss, grads) = results["masked"], results["varlen"]
    assert abs(loss - base_loss) < 1e-5 * abs(base_loss)
    assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5
    # A case the kernel does not take (attention dropout here) goes the other way (on a CPU per
    # example, on a GPU the mask): no kernel call.
    model, _ = load(tiny, "auto")
    model.train()
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.5
    calls = len(kernel.calls)
    torch.manual_seed(0)
    with_dropout = batch_loss(model, batch, LossPath(segmented=True))
    assert len(kernel.calls) == calls and torch.isfinite(with_dropout)


def test_no_varlen_kernel_on_a_cpu_and_flash_attention_2_needs_its_package(tiny):
    import importlib.util

    assert varlen_kernel(torch.device("cpu")) is None
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ModelError, match="flash_attention_2 needs the flash-attn package.*`auto` needs nothing"):
            load(tiny, "flash_attention_2")
    else:  # GPT-J's FlashAttention-2 is ours too, with flash-attn's kernel for packed rows
        model, _ = load(tiny, "flash_attention_2")
        assert {(type(b.attn).__name__, b.attn.varlen) for b in model.transformer.h} == {("GPTJSdpaAttention", "flash_attn")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it on the GPU machine)")
@pytest.mark.parametrize("width,heads", [(64, 4), (512, 2)])  # heads of 16, and of 256 as in GPT-J-6B
def test_varlen_kernel_on_a_gpu(width, heads, monkeypatch):
    """torch's variable-length FlashAttention (or flash-attn's) on packed bf16 rows: the masked
    row's loss and gradients within bf16 rounding, one kernel call per layer."""
    from transformers import GPTJConfig, GPTJForCausalLM

    import gptj_tune.fast as fast

    kernel = varlen_kernel(torch.device("cuda"))
    assert kernel is not None, "no variable-length kernel: torch < 2.10 and no flash-attn"
    calls = []
    monkeypatch.setattr(fast, "varlen_kernel", lambda device, source: calls.append(1) or kernel)
    config = GPTJConfig(vocab_size=512, n_positions=128, n_embd=width, n_head=heads, n_layer=2, rotary_dim=8, bos_token_id=1,
                        eos_token_id=1, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    reference = GPTJForCausalLM(config).to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in packed_batch(512).items()}
    results = {}
    for name in ("masked", "varlen"):
        model = GPTJForCausalLM(config).to("cuda", torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        use_sdpa_attention(model)
        model.train()
        loss = batch_loss(model, batch, LossPath(segmented=name == "varlen"))
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    assert len(calls) == 2  # the varlen run's two layers
    (base_loss, base_grads), (loss, grads) = results["masked"], results["varlen"]
    assert abs(loss - base_loss) < 2e-2 * abs(base_loss)
    for n in grads:
        assert (grads[n] - base_grads[n]).abs().max() <= 0.05 * base_grads[n].abs().max() + 1e-3, n


def test_sdpa_generation_with_left_padding_and_cache_matches_eager(tiny):
    eager, tok = load(tiny, "eager")
    sdpa, _ = load(tiny, "sdpa")
    ids = torch.tensor([[tok.pad_token_id] * 3 + [5, 6, 7], [8, 9, 10, 11, 12, 13]])
    attn = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    kwargs = dict(attention_mask=attn, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    a, b = eager.generate(ids, **kwargs), sdpa.generate(ids, **kwargs)
    assert torch.equal(a, b)
    scores_a = eager(input_ids=ids, attention_mask=attn).logits[:, -1]
    scores_b = sdpa(input_ids=ids, attention_mask=attn).logits[:, -1]
    assert (scores_a - scores_b).abs().max() < 1e-5


def test_a_model_trained_with_sdpa_saves_a_stock_eager_config(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    sdpa, _ = load(tiny, "sdpa")
    sdpa.save_pretrained(tmp_path / "saved")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert stock.config._attn_implementation == "eager"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert (stock(input_ids=ids).logits - sdpa(input_ids=ids).logits).abs().max() < 1e-5


def test_sdpa_on_a_model_without_it_is_a_clear_error_and_auto_falls_back(tmp_path):
    from transformers import GPTNeoForCausalLM

    GPTNeoForCausalLM(tiny_gpt_neo_config(300, width=32, heads=2, window=16)).save_pretrained(tmp_path / "neo")
    from gptj_tune.models import _from_pretrained

    model = _from_pretrained(str(tmp_path / "neo"), ModelSection(attn_implementation="auto"))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ModelError, match="model.attn_implementation: 'sdpa' is not available"):
        _from_pretrained(str(tmp_path / "neo"), ModelSection(attn_implementation="sdpa"))


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
from gptj_tune.fast import loss_from_head, use_loss_head
from gptj_tune.host import keep_freed_memory
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
    with torch.autocast("cpu", dtype=torch.bfloat16), loss_from_head(labels):
        model(input_ids=ids).logits.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    resident.append(int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2**20)
print(*resident)
"""


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
def test_fused_loss_through_the_model_equals_plain(tiny, method):
    """The same model, the same batch: loss sum and every trainable gradient agree."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = load(tiny, "auto")
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


def test_the_fused_head_still_returns_logits_outside_the_loss(tiny):
    model, _ = load(tiny, "auto")
    ids = torch.tensor([[5, 6, 7, 8]])
    before, keys = model(input_ids=ids).logits, list(model.state_dict())
    use_loss_head(model)
    after = model(input_ids=ids).logits
    assert after.shape == before.shape and torch.equal(before, after)
    assert list(model.state_dict()) == keys  # same parameters under the same names


def test_one_kernel_gelu_is_installed_at_load_and_equals_stock_gelu_new(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    ours, _ = load(tiny, "eager")
    stock = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager")
    assert [type(b.mlp.act).__name__ for b in ours.transformer.h] == ["OneKernelGELU"] * SHAPE.layers
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


def test_lora_dropout_is_switched_and_training_still_learns(tiny):
    model, _ = load(tiny, "auto")
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
def test_fused_lora_add_equals_peft(tiny, dropout):
    """Same weights, same seed (so the same dropout masks): the same loss and adapter gradients as
    peft's own forward, and peft's forward is still used when adapters are disabled."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = load(tiny, "auto")
        model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=dropout), False)
        for name, param in model.named_parameters():  # B starts at zero: make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        use_cheap_dropout(model)
        if fused:
            assert use_fused_lora(model) == SHAPE.layers * 6
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


def test_compile_without_a_cpu_compiler_is_a_clear_recipe_error(tiny, monkeypatch):
    from gptj_tune.errors import RecipeError
    from gptj_tune.train import _compile

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    model, _ = load(tiny, "auto")
    with pytest.raises(RecipeError, match="train.compile: torch.compile on CPU needs a C\\+\\+ compiler.*set train.compile: false"):
        _compile(model, torch.device("cpu"))
    assert type(model.transformer.h[0]).__name__ == "GPTJBlock" and not hasattr(type(model.transformer.h[0]), "compiled_for_training")


@pytest.mark.skipif(not can_compile(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("method", ["full", "lora-checkpointed"])
def test_compiled_blocks_train_like_eager_and_evaluate_eagerly(tiny, method):
    """`train.compile`: the same loss and gradients as the eager blocks on packed rows, twice (the
    second batch is narrower: a dynamic width), the blocks share compiled code, evaluation runs
    the eager forward, and the state-dict keys do not change."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    vocab = load(tiny, "auto")[0].config.vocab_size
    batches = [packed_batch(vocab, seed=0), {k: v[:, :50] for k, v in packed_batch(vocab, seed=1).items()}]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = load(tiny, "auto")
        if method == "lora-checkpointed":  # in the order models.py and methods.py apply them
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=0.0), True)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
            use_fused_lora(model)
        if compiled:
            captured = counters["stats"]["calls_captured"]
            assert compile_blocks(model) == SHAPE.layers
            assert compile_blocks(model) == 0  # already switched
        model.train()
        runs = []
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = batch_loss(model, batch, LossPath(fused_chunk=None))
            loss.backward()
            runs.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        if compiled:
            traced = counters["stats"]["calls_captured"]
            assert traced > captured  # the blocks ran compiled code
            model.eval()
            with torch.no_grad():
                eval_loss = float(batch_loss(model, batches[0]))
            assert counters["stats"]["calls_captured"] == traced  # evaluation: eager, nothing traced
            assert abs(eval_loss - results[0][0][0][0]) < 1e-4 * abs(eval_loss)
        results.append((runs, list(model.state_dict())))
    (eager_runs, eager_keys), (compiled_runs, compiled_keys) = results
    assert compiled_keys == eager_keys
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads) in zip(eager_runs, compiled_runs):
        assert abs(eager_loss - compiled_loss) < 1e-4 * abs(eager_loss)
        assert eager_grads.keys() == compiled_grads.keys()
        assert max((eager_grads[n] - compiled_grads[n]).abs().max() for n in eager_grads) < 1e-5


def test_batches_rounded_up_to_a_width_multiple_give_the_same_loss(tiny):
    """With 16-bit products on a CPU, batch widths are rounded up to a multiple of 64 (few matrix
    shapes for oneDNN): the padding is its own segment and never a target, so loss and target count
    are those of the batch as wide as its longest row."""
    from gptj_tune.data.tokenize import Batches, Row

    g = torch.Generator().manual_seed(1)
    rows = []
    for parts in ([20, 17], [30, 12, 8]):  # packed rows of 37 and 50 tokens
        ids = torch.randint(3, 200, (sum(parts),), generator=g).tolist()
        labels = [IGNORE] * 4 + ids[4:]
        rows.append(Row(ids, labels, [p for n in parts for p in range(n)]))
    torch.manual_seed(0)
    model, tok = load(tiny, "auto")
    model.eval()
    seen = []
    for multiple in (1, 64):
        batch = Batches(rows, 2, tok.pad_token_id, 0, shuffle=False, width_multiple=multiple).device_batch(0)
        with torch.no_grad():
            seen.append((batch["input_ids"].shape[1], target_count(batch), float(batch_loss(model, batch))))
    (w1, n1, loss1), (w64, n64, loss64) = seen
    assert (w1, w64) == (50, 64) and n1 == n64 > 0
    assert abs(loss1 - loss64) < 1e-5 * loss1
