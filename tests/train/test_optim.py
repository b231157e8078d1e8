"""The optimizer side of a step (train/optim.py): torch's fused AdamW where it applies, clipping folded
into the fused step, and KahanAdamW for weights held in 16 bits, each equal to its reference."""

from __future__ import annotations

import pytest


def small_net(dtype=None):
    """Linear, LayerNorm, Linear: 2-D weights with weight decay and 1-D ones without."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    return net if dtype is None else net.to(dtype)


def decay_groups(model):
    """The parameter groups build_optimizer makes (weight decay 0.1): decay on 2-D weights only."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


def test_adamw_is_fused_for_plain_parameters_and_steps_like_the_loop():
    import torch

    from gptj_tune.recipe import TrainSection
    from gptj_tune.train.optim import build_optimizer

    torch.manual_seed(0)
    models = [small_net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], TrainSection(lr=1e-2, weight_decay=0.1))
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(decay_groups(models[1]), lr=1e-2)  # the per-parameter loop
    x = torch.randn(64, 16)
    for _ in range(5):
        for model, opt in ((models[0], fused), (models[1], loop)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert (a - b).abs().max() < 1e-6


def test_clipping_inside_the_fused_step_equals_clip_grad_norm():
    """The loop hands clipping to fused AdamW (gradients divided inside its kernel): the same norms
    and parameters as clip_grad_norm_ then the step, clipped or not; only for fused AdamW."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from gptj_tune.recipe import TrainSection
    from gptj_tune.train.optim import build_optimizer, clip_in_fused_step, step_takes_the_clip

    single, deepspeed = (SimpleNamespace(distributed_type=t) for t in (DistributedType.NO, DistributedType.DEEPSPEED))

    torch.manual_seed(0)
    models = [small_net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, TrainSection(lr=1e-2, weight_decay=0.1)) for m in models]
    assert step_takes_the_clip(optimizers[0], single) is optimizers[0]
    assert step_takes_the_clip(optimizers[0], deepspeed) is None  # its engine clips
    assert step_takes_the_clip(torch.optim.AdamW(models[1].parameters()), single) is None  # not fused
    clipped = 0
    for step in range(6):
        x, scale = torch.randn(64, 16), (100.0 if step % 2 else 1e-3)  # norms far above and below max_norm
        norms = []
        for k, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
            opt.zero_grad()
            (model(x).pow(2).mean() * scale).backward()
            if k == 0:
                norms.append(float(clip_in_fused_step(opt, 1.0)))
                opt.step()
                del opt.grad_scale
            else:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
                opt.step()
        assert abs(norms[0] - norms[1]) <= 1e-6 * norms[1]
        clipped += norms[1] > 1.0
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert (a - b).abs().max() < 1e-6, step
    assert clipped == 3


def test_kahan_adamw_keeps_the_updates_that_bf16_weights_round_away(monkeypatch):
    """60 steps at lr 2e-5 (Alpaca's full fine-tuning lr) on a tiny GPT-J held in bf16: torch's AdamW
    rounds most updates back to the old weight; KahanAdamW's weight + compensation stays within 3% of
    the fp32 run's update. build_optimizer picks it for 16-bit weights unless told not to."""
    import copy

    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from gptj_tune.recipe import TrainSection
    from gptj_tune.train.optim import KahanAdamW, build_optimizer

    monkeypatch.setattr(KahanAdamW, "CPU_CHUNK", 3000)  # most weights in several chunks, the last one short
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=512, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=64, bos_token_id=0, eos_token_id=0)
    reference, ids = GPTJForCausalLM(config), torch.randint(0, 512, (16, 64))

    def run(dtype, kahan: bool):
        model = copy.deepcopy(reference).to(dtype)
        start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, TrainSection(lr=2e-5, weight_decay=0.1, kahan_summation=kahan))
        for step in range(60):
            batch = ids[step % 4 * 4 : step % 4 * 4 + 4]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        kept = {n: opt.state[p].get("compensation", torch.zeros(())).float() for n, p in model.named_parameters()}
        return opt, {n: p.detach().float() + kept[n] - start[n] for n, p in model.named_parameters()}

    fp32_opt, exact = run(torch.float32, True)
    kahan_opt, kahan = run(torch.bfloat16, True)
    plain_opt, plain = run(torch.bfloat16, False)
    assert type(fp32_opt) is torch.optim.AdamW and type(kahan_opt) is KahanAdamW and type(plain_opt) is torch.optim.AdamW
    assert build_optimizer(copy.deepcopy(reference).to(torch.bfloat16), TrainSection(), master_weights_elsewhere=True).__class__ is torch.optim.AdamW

    def off(update):
        return float(sum(((update[n] - exact[n]) ** 2).sum() for n in exact).sqrt() / sum((u**2).sum() for u in exact.values()).sqrt())

    assert off(kahan) < 0.03, off(kahan)
    assert off(plain) > 0.5, off(plain)


def test_kahan_adamw_is_torchs_adamw_on_fp32_weights_takes_the_clip_and_resumes_exactly():
    import copy
    import io
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from gptj_tune.train.optim import KahanAdamW, clip_in_fused_step, step_takes_the_clip

    torch.manual_seed(0)
    models = [small_net() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours, theirs = KahanAdamW(decay_groups(models[0]), lr=1e-2), torch.optim.AdamW(decay_groups(models[1]), lr=1e-2)
    assert step_takes_the_clip(ours, SimpleNamespace(distributed_type=DistributedType.NO)) is ours
    for step in range(6):
        x, scale = torch.randn(64, 16), (100.0 if step % 2 else 1e-3)  # clipped, and not
        for model in models:
            model.zero_grad()
            (model(x).pow(2).mean() * scale).backward()
        clip_in_fused_step(ours, 1.0)
        ours.step()
        del ours.grad_scale
        torch.nn.utils.clip_grad_norm_(models[1].parameters(), 1.0)
        theirs.step()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert (a - b).abs().max() < 1e-6, step

    # bf16 weights: 3 steps, save, load into a fresh copy, 3 more == 6 steps uninterrupted (exactly)
    def steps(model, opt, first, count):
        for k in range(first, first + count):
            model.zero_grad()
            model(torch.randn(64, 16, generator=torch.Generator().manual_seed(k)).bfloat16()).pow(2).mean().backward()
            opt.step()

    torch.manual_seed(1)
    start = small_net(torch.bfloat16)
    whole = copy.deepcopy(start)
    whole_opt = KahanAdamW(decay_groups(whole), lr=1e-3)
    steps(whole, whole_opt, 0, 6)
    half = copy.deepcopy(start)
    half_opt = KahanAdamW(decay_groups(half), lr=1e-3)
    steps(half, half_opt, 0, 3)
    saved_model, saved_opt = io.BytesIO(), io.BytesIO()
    torch.save(half.state_dict(), saved_model)
    torch.save(half_opt.state_dict(), saved_opt)
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(torch.load(io.BytesIO(saved_model.getvalue())))
    resumed_opt = KahanAdamW(decay_groups(resumed), lr=1e-3)
    resumed_opt.load_state_dict(torch.load(io.BytesIO(saved_opt.getvalue())))
    steps(resumed, resumed_opt, 3, 3)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(whole_opt.state[a]["compensation"], resumed_opt.state[b]["compensation"])
        assert resumed_opt.state[b]["compensation"].dtype == torch.bfloat16 and resumed_opt.state[b]["compensation"].abs().max() > 0

    # a checkpoint of plain AdamW (train.kahan_summation was off) resumed with it on: compensation starts at zero
    plain = copy.deepcopy(start)
    plain_opt = torch.optim.AdamW(decay_groups(plain), lr=1e-3)
    steps(plain, plain_opt, 0, 3)
    switched = KahanAdamW(decay_groups(plain), lr=1e-3)
    switched.load_state_dict(plain_opt.state_dict())
    steps(plain, switched, 3, 1)
    assert all(switched.state[p]["compensation"].abs().max() > 0 for p in plain.parameters())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_kahan_update_equals_the_chunked_one(monkeypatch, device):
    """The one-kernel update (torch.compile of `_kahan_update`: C++ on a CPU, Triton on a GPU) moves
    16-bit weights, moments and compensation as the chunked fp32 passes do, with weight decay, a
    clip and a changing lr: the same values within one rounding of the 16-bit result. Weights of
    one shape go through one compiled call in batches (here 5 square weights: a batch of 4 and 1;
    biases and norms of 32: 8 + 2 + 1)."""
    import torch

    from gptj_tune.model.compile import CompileUnavailable, check_can_compile
    from gptj_tune.train.optim import KahanAdamW, clip_in_fused_step

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run it on the GPU machine)")
    try:
        check_can_compile(torch.device(device))
    except CompileUnavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    models = [torch.nn.Sequential(small_net(), torch.nn.Linear(4, 32), *[torch.nn.Linear(32, 32) for _ in range(5)],
                                  torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)).to(device, torch.bfloat16) for _ in range(2)]  # fmt: skip
    models[1].load_state_dict(models[0].state_dict())
    before = [p.detach().clone() for p in models[0].parameters()]
    monkeypatch.setattr(KahanAdamW, "CPU_CHUNK", 300)  # the chunked path in several chunks
    monkeypatch.setattr(KahanAdamW, "DEVICE_CHUNK", 300)
    # Past dynamo's recompile limit the update would run uncompiled, correct but slow: fail instead.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    chunked = KahanAdamW(decay_groups(models[0]), lr=1e-2, fused=False)
    fused = KahanAdamW(decay_groups(models[1]), lr=1e-2, fused=True)
    for step in range(5):  # the same gradients for both (from the chunked model): only the updates differ
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step)).to(device, torch.bfloat16)
        models[0].zero_grad()
        (models[0](x).float().pow(2).mean() * (100.0 if step % 2 else 1.0)).backward()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            b.grad = a.grad.clone()
        for opt in (chunked, fused):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (step + 1) / 5
            clip_in_fused_step(opt, 1.0)
            opt.step()
            del opt.grad_scale
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        moved = a.detach().float()
        assert (moved - b.detach().float()).abs().max() <= moved.abs().max() * 2**-7, "weights"
        sa, sb = chunked.state[a], fused.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[key].float(), sb[key].float(), rtol=2**-7, atol=1e-30), key
        # weight + compensation: the 16-bit pair carries ~16 bits, equal far below one bf16 rounding
        exact_a = a.detach().float() + sa["compensation"].float()
        exact_b = b.detach().float() + sb["compensation"].float()
        assert (exact_a - exact_b).abs().max() <= exact_a.abs().max() * 2**-12, "weight + compensation"
    assert all((p.detach() != q).float().mean() > 0.5 for p, q in zip(models[1].parameters(), before, strict=True))


def test_gptj_6b_weights_take_few_compiled_calls_of_few_sizes():
    """Horizontal fusion of the one-kernel update: GPT-J-6B's 285 trainable tensors (meta device,
    full fine-tuning's two weight-decay groups) are updated in 25 compiled calls of at most 5 batch
    sizes, every weight exactly once."""
    import torch

    from gptj_tune.train.optim import _BATCH_SIZES, _batches
    from transformers import GPTJConfig, GPTJForCausalLM

    with torch.device("meta"):
        model = GPTJForCausalLM(GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400))
    calls, updated = [], []
    for group in decay_groups(model):
        by_shape: dict[tuple, list] = {}
        for p in group["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for entries in by_shape.values():
            for batch in _batches(entries):
                calls.append(len(batch))
                updated += batch
    assert len(updated) == len(list(model.parameters())) == 285
    assert {id(p) for p in updated} == {id(p) for p in model.parameters()}
    assert len(calls) == 25 and set(calls) <= set(_BATCH_SIZES) and max(calls) == 16


@pytest.mark.slow  # ~40 s: bitsandbytes' CPU blockwise kernels are slow
def test_8bit_states_track_adamw_take_a_byte_a_moment_and_resume_exactly(monkeypatch):
    """`train.optimizer: adamw_8bit`: 60 steps at lr 2e-5 on a tiny GPT-J held in bf16 stay within
    10% of the fp32 AdamW run's update (the 16-bit KahanAdamW's is 3%: the moments' 8-bit rounding
    adds the rest); its moments take one byte a value plus 4 bytes a block of 256; three steps,
    save, load into a fresh copy, three more equal six uninterrupted, bit for bit (the states keep
    their dtypes through torch's load_state_dict, which would cast them to the weights')."""
    import copy
    import io

    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from gptj_tune.recipe import TrainSection
    from gptj_tune.train.optim import KahanAdamW, build_optimizer

    monkeypatch.setattr(KahanAdamW, "CPU_CHUNK", 3000)  # several chunks a weight, rounded to whole blocks of 256
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=512, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=64, bos_token_id=0, eos_token_id=0)
    reference, ids = GPTJForCausalLM(config), torch.randint(0, 512, (16, 64))

    def steps(model, opt, first, count):
        for step in range(first, first + count):
            batch = ids[step % 4 * 4 : step % 4 * 4 + 4]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()

    def update(dtype, optimizer):
        model = copy.deepcopy(reference).to(dtype)
        start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, TrainSection(lr=2e-5, weight_decay=0.1, optimizer=optimizer))
        steps(model, opt, 0, 60)
        kept = {n: opt.state[p].get("compensation", torch.zeros(())).float() for n, p in model.named_parameters()}
        return opt, {n: p.detach().float() + kept[n] - start[n] for n, p in model.named_parameters()}

    _, exact = update(torch.float32, "adamw")
    eight_opt, eight = update(torch.bfloat16, "adamw_8bit")
    assert type(eight_opt) is KahanAdamW and eight_opt.state_bits == 8
    off = float(sum(((eight[n] - exact[n]) ** 2).sum() for n in exact).sqrt() / sum((u**2).sum() for u in exact.values()).sqrt())
    assert off < 0.10, off
    for p, state in eight_opt.state.items():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8 and state["exp_avg"].numel() == p.numel()
        assert state["exp_avg_absmax"].numel() == -(-p.numel() // 256) and state["compensation"].dtype == torch.bfloat16
    assert any(bool((s["exp_avg_absmax"] > 0).any()) for s in eight_opt.state.values())

    whole = copy.deepcopy(reference).bfloat16()
    whole_opt = build_optimizer(whole, TrainSection(lr=1e-3, optimizer="adamw_8bit"))
    steps(whole, whole_opt, 0, 6)
    half = copy.deepcopy(reference).bfloat16()
    half_opt = build_optimizer(half, TrainSection(lr=1e-3, optimizer="adamw_8bit"))
    steps(half, half_opt, 0, 3)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": half_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(reference).bfloat16()
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_optimizer(resumed, TrainSection(lr=1e-3, optimizer="adamw_8bit"))
    resumed_opt.load_state_dict(saved["optimizer"])
    assert all(s["exp_avg"].dtype == torch.uint8 and s["exp_avg_absmax"].dtype == torch.float32 for s in resumed_opt.state.values())
    steps(resumed, resumed_opt, 3, 3)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # a run that kept 16-bit states cannot be continued with 8-bit ones (and back): a clear error
    plain = build_optimizer(copy.deepcopy(reference).bfloat16(), TrainSection(lr=1e-3, optimizer="adamw"))
    plain.load_state_dict(saved["optimizer"])
    with pytest.raises(Exception, match="optimizer states are adamw_8bit's, this recipe's train.optimizer is adamw"):
        model = next(iter(plain.param_groups[0]["params"]))
        model.grad = torch.zeros_like(model)
        plain.step()
