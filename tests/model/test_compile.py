"""`train.compile` (model/compile.py): compiled blocks train like the eager ones (the same loss and
gradients, full and LoRA with gradient checkpointing, across batch widths), evaluate eagerly, keep
the state-dict keys, attend within packed examples; no C++ compiler is a clear recipe error."""

from __future__ import annotations

import pytest
import torch
from conftest import SPEED_SHAPE_ARGS, can_compile, load_tiny, packed_batch

from gptj_tune.errors import RecipeError
from gptj_tune.model.compile import compile_blocks, triton_problem
from gptj_tune.model.kernels import use_fused_lora
from gptj_tune.model.methods import apply_method
from gptj_tune.recipe import LoraMethod
from gptj_tune.train.step import LossPath, batch_loss

LAYERS = SPEED_SHAPE_ARGS["layers"]


def test_compile_without_a_cpu_compiler_is_a_clear_recipe_error(tiny_gptj, monkeypatch):
    from gptj_tune.train.setup import compile_model as _compile

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    model, _ = load_tiny(tiny_gptj, "auto")
    with pytest.raises(RecipeError, match="train.compile: torch.compile on CPU needs a C\\+\\+ compiler.*set train.compile: false"):
        _compile(model, torch.device("cpu"))
    assert type(model.transformer.h[0]).__name__ == "GPTJBlock" and not hasattr(type(model.transformer.h[0]), "compiled_for_training")


@pytest.mark.parametrize("capability,bf16,problem", [
    ((9, 0), True, None),
    ((8, 0), True, None),
    ((7, 5), False, None),  # a T4 compiles fp16 work
    ((7, 5), True, "torch.compile's Triton has no bf16 before compute capability 8.0 (Ampere), and this GPU is 7.5"),
    ((6, 0), False, "torch.compile's Triton needs a GPU of compute capability 7.0 or newer, and this one is 6.0"),
])  # fmt: skip
def test_gpus_triton_cannot_build_for_are_named_and_auto_leaves_them_eager(capability, bf16, problem):
    """On a GPU `check_can_compile` raises this reason (so `train.compile: auto` runs eager there and
    `train.compile: true` is a recipe error saying why)."""
    assert triton_problem(capability, bf16) == problem


def losses_and_grads(model, batches, path: LossPath, after_each=None) -> list:
    """(loss, gradients) of each batch in turn, the model in training mode; `after_each` runs after each."""
    model.train()
    runs = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = batch_loss(model, batch, path)
        loss.backward()
        runs.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        if after_each is not None:
            after_each()
    return runs


@pytest.mark.skipif(not can_compile(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("method", ["full", "lora-checkpointed"])
def test_compiled_blocks_train_like_eager_and_evaluate_eagerly(tiny_gptj, method):
    """`train.compile`: the same loss and gradients as the eager blocks on packed rows, twice (the
    second batch is narrower: a dynamic width), the blocks share compiled code, evaluation runs
    the eager forward, and the state-dict keys do not change."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    vocab = load_tiny(tiny_gptj, "auto")[0].config.vocab_size
    batches = [packed_batch(vocab, seed=0), {k: v[:, :50] for k, v in packed_batch(vocab, seed=1).items()}]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = load_tiny(tiny_gptj, "auto")
        if method == "lora-checkpointed":  # in the order model/load.py and model/methods.py apply them
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=0.0), True)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
            use_fused_lora(model)
        if compiled:
            captured = counters["stats"]["calls_captured"]
            assert compile_blocks(model) == LAYERS
            assert compile_blocks(model) == 0  # already switched
        runs = losses_and_grads(model, batches, LossPath(fused_chunk=None))
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


@pytest.mark.skipif(not can_compile(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_attend_within_packed_examples(tiny_gptj, monkeypatch):
    """Compiled blocks run the attention outside their graph, per packed example as marked for the
    batch (on a GPU the variable-length kernel): as eager does, through gradient checkpointing's
    recomputation too, with no recompilation for the next batch's different examples."""
    from torch._dynamo.utils import counters

    from gptj_tune.model import attention
    from gptj_tune.model.attention import Segments

    monkeypatch.setattr(Segments, "MIN_WIDTH", 0)  # per example on these small rows too
    calls = []
    per_example = attention._segmented_attention
    monkeypatch.setattr(attention, "_segmented_attention", lambda *a, **k: calls.append(1) or per_example(*a, **k))
    torch._dynamo.reset()
    vocab = load_tiny(tiny_gptj, "auto")[0].config.vocab_size
    batches = [packed_batch(vocab, seed=0), packed_batch(vocab, seed=1)]
    batches[1]["position_ids"] = torch.cat([torch.arange(64)[None], batches[1]["position_ids"][1:]])  # other segments
    results, counts, graphs = [], [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = load_tiny(tiny_gptj, "auto")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_method(model, LoraMethod(kind="lora", r=4, dropout=0.0), True)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        if compiled:
            compile_blocks(model)
        calls.clear()
        results.append(losses_and_grads(model, batches, LossPath(segmented=True),
                                        after_each=lambda: graphs.append(counters["stats"]["unique_graphs"])))  # fmt: skip
        counts.append(len(calls))
    assert counts[0] >= LAYERS * len(batches) and counts[1] == counts[0], counts  # each block, as eager does
    assert graphs[0] == graphs[1] < graphs[2] == graphs[3], graphs  # compiled for batch 1, not again for batch 2
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads) in zip(*results, strict=True):
        assert abs(eager_loss - compiled_loss) < 1e-4 * abs(eager_loss)
        assert max((eager_grads[n] - compiled_grads[n]).abs().max() for n in eager_grads) < 1e-5
