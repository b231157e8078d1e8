"""GPT-J's attention (gptj_tune/model/attention.py) equals transformers' eager attention: on packed rows
under the block-causal mask, per packed example, through a variable-length kernel (a reference one on
the CPU, the real one on a GPU), recomputed under gradient checkpointing, and in generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SPEED_SHAPE_ARGS, load_tiny, packed_batch, tiny_gpt_neo_config

from gptj_tune.model import attention
from gptj_tune.model.attention import Segments, VarlenKernel, _segmented_attention, block_causal_mask, flash_runs, mark_segments, use_sdpa_attention, varlen_kernel
from gptj_tune.errors import ModelError, RecipeError
from gptj_tune.model.loss_head import model_loss, use_loss_head
from gptj_tune.recipe import ModelSection, Recipe
from gptj_tune.train.step import LossPath, batch_loss

LAYERS = SPEED_SHAPE_ARGS["layers"]


def test_sdpa_is_used_and_matches_eager_on_packed_rows(tiny_gptj):
    eager, _ = load_tiny(tiny_gptj, "eager")
    sdpa, _ = load_tiny(tiny_gptj, "auto")
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


def test_segmented_attention_equals_the_masked_row_and_ignores_the_mask(tiny_gptj):
    """On CPU the step runs attention one packed example at a time: the same loss and gradients as
    the whole row under the block-causal mask, and with the segments set the mask is not what keeps
    examples apart (a mask that lets every token see every other changes nothing)."""
    batch = packed_batch(512)
    results = {}
    for name in ("masked", "segmented", "segmented-open-mask"):
        model, _ = load_tiny(tiny_gptj, "auto")
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
            loss = model_loss(model, batch["labels"], 16, input_ids=batch["input_ids"], position_ids=positions, attention_mask=mask)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    base_loss, base_grads = results["masked"]
    for name in ("segmented", "segmented-open-mask"):
        loss, grads = results[name]
        assert abs(loss - base_loss) < 1e-5 * abs(base_loss), name
        assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5, name


def test_a_step_runs_attention_per_example_only_where_it_pays(tiny_gptj, monkeypatch):
    """512-token rows of 128-token examples: one attention call per example in every layer; the
    same step on short rows, or on rows of tiny examples, keeps the masked call."""

    calls = []
    monkeypatch.setattr(attention, "_segmented_attention", lambda *a, **k: calls.append(1) or segmented(*a, **k))
    segmented = _segmented_attention
    model, _ = load_tiny(tiny_gptj, "auto")
    model.train()

    def batch(width, example):
        positions = torch.arange(width).remainder(example)[None].repeat(2, 1)
        ids = torch.randint(3, model.config.vocab_size, (2, width))
        return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}

    for width, example, segments in [(512, 128, True), (512, 16, False), (128, 128, False)]:
        calls.clear()
        batch_loss(model, batch(width, example), LossPath(segmented=True)).backward()
        assert len(calls) == (LAYERS if segments else 0), (width, example)
    calls.clear()
    batch_loss(model, batch(512, 128), LossPath(segmented=False)).backward()
    assert not calls


def test_the_segments_are_read_from_the_host_copy_of_the_positions():
    """On a GPU the packed examples are read from the batch before it moved (no device-to-host wait
    per micro-batch): given `host`, the device tensor is never read. A meta tensor stands in for
    the device one: reading it would raise."""
    positions = torch.arange(512).remainder(100)[None].repeat(2, 1)
    on_device = positions.to("meta")
    segments = mark_segments(on_device, host=positions)
    assert getattr(on_device, attention.SEGMENTS) is segments
    assert segments.rows == Segments(positions).rows == [[(0, 100), (100, 200), (200, 300), (300, 400), (400, 500), (500, 512)]] * 2
    with pytest.raises(NotImplementedError):
        mark_segments(positions.to("meta"))  # without the host copy it reads the device tensor


def test_checkpointed_blocks_recompute_per_example_too(tiny_gptj, monkeypatch):
    """With gradient checkpointing, backward recomputes each block with the inputs forward had: the
    packed examples travel on the position ids, so the recomputation runs per example too (on a
    GPU: the same variable-length kernel) and gives the masked row's loss and gradients. (Had it
    taken the masked call, torch's checkpoint would refuse: a different number of saved tensors.)"""

    calls = []
    monkeypatch.setattr(attention, "_segmented_attention", lambda *a, **k: calls.append(1) or segmented(*a, **k))
    segmented = _segmented_attention
    positions = torch.arange(512).remainder(128)[None].repeat(2, 1)  # rows where per-example pays
    ids = torch.randint(3, 500, (2, 512), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("masked", "per example"):
        batch = {"input_ids": ids, "position_ids": positions.clone(), "labels": ids.clone()}
        model, _ = load_tiny(tiny_gptj, "auto")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls.clear()
        loss = batch_loss(model, batch, LossPath(segmented=name != "masked"))
        loss.backward()
        results[name] = (len(calls), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (masked_calls, base_loss, base_grads), (calls_made, loss, grads) = results["masked"], results["per example"]
    assert (masked_calls, calls_made) == (0, 2 * LAYERS)  # forward and recomputation
    assert abs(loss - base_loss) < 1e-5 * abs(base_loss)
    assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5


def test_segments_follow_the_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    segments = Segments(positions)
    assert segments.rows == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 7), (7, 9)]]
    # for a variable-length kernel: the rows laid end to end, every example's start, then the total
    assert segments.cu_seqlens(torch.device("cpu")).tolist() == [0, 3, 5, 9, 15, 16, 18] and segments.longest == 6


def test_loss_path_of_a_recipe_and_its_model(tiny_gptj):
    output = {"dir": "unused"}
    assert LossPath.of(Recipe.model_validate({"output": output})).segmented
    checkpointed = {"gradient_checkpointing": True}
    assert LossPath.of(Recipe.model_validate({"model": checkpointed, "output": output})).segmented  # see above
    compiled = {"compile": True}  # compiled blocks attend outside their graph (test_compile.py)
    assert LossPath.of(Recipe.model_validate({"train": compiled, "output": output})).segmented
    flash = Recipe.model_validate({"model": {"attn_implementation": "flash_attention_2"}, "output": output})
    gptj, _ = load_tiny(tiny_gptj, "auto")
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


def test_varlen_kernel_path_equals_the_masked_row(tiny_gptj, monkeypatch):
    """On a GPU a packed batch's attention is one variable-length kernel call per layer over the
    rows laid end to end. The reshaping around the kernel and the example boundaries it gets give
    the masked row's loss and gradients (here with a reference kernel on the CPU; the real kernel
    on a GPU: test_varlen_kernel_on_a_gpu)."""

    batch = packed_batch(512)
    kernel = ReferenceVarlen()
    results = {}
    for name in ("masked", "varlen"):
        model, _ = load_tiny(tiny_gptj, "auto")
        model.train()
        if name == "varlen":  # (on a GPU a batch always takes the segments; on a CPU where it pays)
            monkeypatch.setattr(attention, "varlen_kernel", lambda device, source: kernel)
            monkeypatch.setattr(Segments, "MIN_WIDTH", 0)
            monkeypatch.setattr(Segments, "MIN_MEAN_LENGTH", 0)
        loss = batch_loss(model, batch, LossPath(segmented=name == "varlen"))
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert kernel.calls == [([0, 20, 50, 64, 104, 120, 128], 40, (128, 4, 16))] * LAYERS
    (base_loss, base_grads), (loss, grads) = results["masked"], results["varlen"]
    assert abs(loss - base_loss) < 1e-5 * abs(base_loss)
    assert max((grads[n] - base_grads[n]).abs().max() for n in grads) < 1e-5
    # A case the kernel does not take (attention dropout here) goes the other way (on a CPU per
    # example, on a GPU the mask): no kernel call.
    model, _ = load_tiny(tiny_gptj, "auto")
    model.train()
    for block in model.transformer.h:
        if hasattr(block.attn, "attn_dropout"):  # transformers < 5.24
            block.attn.attn_dropout.p = 0.5
        else:
            block.attn.attention_dropout = 0.5
    calls = len(kernel.calls)
    torch.manual_seed(0)
    with_dropout = batch_loss(model, batch, LossPath(segmented=True))
    assert len(kernel.calls) == calls and torch.isfinite(with_dropout)


def test_no_varlen_kernel_on_a_cpu_and_flash_attention_2_needs_its_package(tiny_gptj):
    import importlib.util

    assert varlen_kernel(torch.device("cpu")) is None
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ModelError, match="flash_attention_2 needs the flash-attn package.*`auto` needs nothing"):
            load_tiny(tiny_gptj, "flash_attention_2")
    else:  # GPT-J's FlashAttention-2 is ours too, with flash-attn's kernel for packed rows
        model, _ = load_tiny(tiny_gptj, "flash_attention_2")
        assert {(type(b.attn).__name__, b.attn.varlen) for b in model.transformer.h} == {("GPTJSdpaAttention", "flash_attn")}


@pytest.mark.parametrize("capability,head_dim,dropout_p,training,runs", [
    ((7, 5), 256, 0.0, True, False),   # T4 (Turing): no FlashAttention; the masked call runs instead
    ((7, 0), 64, 0.0, False, False),   # V100 (Volta)
    ((8, 0), 256, 0.0, True, True),    # A100: GPT-J-6B's 256-wide heads, training
    ((9, 0), 256, 0.1, True, True),    # H100, with dropout (flash-attn's kernel takes it)
    ((8, 6), 256, 0.0, True, True),    # A10, RTX 3090: 256-wide heads train without dropout
    ((8, 9), 256, 0.1, True, False),   # RTX 4090: not with dropout
    ((8, 6), 200, 0.0, True, False),   # nor heads in (192, 224]
    ((8, 6), 200, 0.0, False, True),   # which run without gradients
    ((12, 0), 208, 0.0, True, False),  # RTX 50xx: the same rule
    ((9, 0), 288, 0.0, False, False),  # heads wider than 256: never
])  # fmt: skip
def test_the_variable_length_kernel_is_used_only_where_flash_attention_runs(capability, head_dim, dropout_p, training, runs):
    """PyTorch's rules for its fused FlashAttention, applied before the kernel is called: a GPU or a
    head width it refuses takes the masked attention instead of failing the step."""
    assert flash_runs(capability, head_dim, dropout_p, training) is runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it on the GPU machine)")
@pytest.mark.parametrize("width,heads", [(64, 4), (512, 2)])  # heads of 16, and of 256 as in GPT-J-6B
def test_varlen_kernel_on_a_gpu(width, heads, monkeypatch):
    """torch's variable-length FlashAttention (or flash-attn's) on packed bf16 rows: the masked
    row's loss and gradients within bf16 rounding, one kernel call per layer, in compiled blocks
    (`train.compile`) too, where the attention runs outside the graph."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from gptj_tune.model.compile import compile_blocks


    kernel = varlen_kernel(torch.device("cuda"))
    assert kernel is not None, "no variable-length kernel: torch < 2.10 and no flash-attn"
    calls = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda device, source: calls.append(1) or kernel)
    config = GPTJConfig(vocab_size=512, n_positions=128, n_embd=width, n_head=heads, n_layer=2, rotary_dim=8, bos_token_id=1,
                        eos_token_id=1, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    reference = GPTJForCausalLM(config).to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in packed_batch(512).items()}
    results = {}
    for name in ("masked", "varlen", "compiled varlen"):
        model = GPTJForCausalLM(config).to("cuda", torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        use_sdpa_attention(model)
        if name == "compiled varlen":
            assert compile_blocks(model) == 2
        model.train()
        loss = batch_loss(model, batch, LossPath(segmented=name != "masked"))
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    assert len(calls) == 4  # the two varlen runs' two layers
    base_loss, base_grads = results["masked"]
    for loss, grads in (results["varlen"], results["compiled varlen"]):
        assert abs(loss - base_loss) < 2e-2 * abs(base_loss)
        for n in grads:
            assert (grads[n] - base_grads[n]).abs().max() <= 0.05 * base_grads[n].abs().max() + 1e-3, n


def test_sdpa_generation_with_left_padding_and_cache_matches_eager(tiny_gptj):
    eager, tok = load_tiny(tiny_gptj, "eager")
    sdpa, _ = load_tiny(tiny_gptj, "sdpa")
    ids = torch.tensor([[tok.pad_token_id] * 3 + [5, 6, 7], [8, 9, 10, 11, 12, 13]])
    attn = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    kwargs = dict(attention_mask=attn, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    a, b = eager.generate(ids, **kwargs), sdpa.generate(ids, **kwargs)
    assert torch.equal(a, b)
    scores_a = eager(input_ids=ids, attention_mask=attn).logits[:, -1]
    scores_b = sdpa(input_ids=ids, attention_mask=attn).logits[:, -1]
    assert (scores_a - scores_b).abs().max() < 1e-5


def test_a_model_trained_with_our_attention_saves_a_stock_config(tiny_gptj, tmp_path):
    """Our attention is a switch at load time, never part of what is saved: stock transformers loads
    the folder with its own attention (`eager`, or its own `sdpa` from 5.24 on) and the same logits."""
    from transformers import AutoModelForCausalLM
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    ours, _ = load_tiny(tiny_gptj, "sdpa")
    assert ours.config._attn_implementation == "eager"
    ours.save_pretrained(tmp_path / "saved")
    assert "gptj_tune" not in (tmp_path / "saved" / "config.json").read_text()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert {type(block.attn) for block in stock.transformer.h} == {GPTJAttention}
    assert stock.config._attn_implementation in ("eager", "sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert (stock(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() < 1e-5


def test_sdpa_on_a_model_without_it_is_a_clear_error_and_auto_falls_back(tmp_path):
    from transformers import GPTNeoForCausalLM

    GPTNeoForCausalLM(tiny_gpt_neo_config(300, width=32, heads=2, window=16)).save_pretrained(tmp_path / "neo")
    from gptj_tune.model.load import _from_pretrained

    model = _from_pretrained(str(tmp_path / "neo"), ModelSection(attn_implementation="auto"))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ModelError, match="model.attn_implementation: 'sdpa' is not available"):
        _from_pretrained(str(tmp_path / "neo"), ModelSection(attn_implementation="sdpa"))
