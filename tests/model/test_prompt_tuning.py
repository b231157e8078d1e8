"""Prompt tuning (`method.kind: prompt_tuning`): a soft prompt on a frozen model. The same prompt is
seen by every packed example, learns, saves in peft's format, evaluates, exports and generates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, load_tiny, small_recipe, write_recipe

from gptj_tune.errors import RecipeError
from gptj_tune.model.methods import SoftPromptModel, initial_prompt
from gptj_tune.recipe import PromptTuningMethod, load_recipe

N = 6  # virtual tokens in the unit tests


def _soft_prompt_model(path, n=N, seed=0):
    model, tokenizer = load_tiny(path, "auto")
    return SoftPromptModel(model.requires_grad_(False), initial_prompt(model, PromptTuningMethod(kind="prompt_tuning", num_virtual_tokens=n), tokenizer, seed)), tokenizer


def test_every_packed_example_sees_the_prompt_as_it_would_alone(tiny_gptj):
    from gptj_tune.model.attention import block_causal_mask

    model, _ = _soft_prompt_model(tiny_gptj)
    model.eval()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(3, 200, (k,), generator=g) for k in (11, 17, 5)]
    # One packed row: each example behind N slot tokens (any id), positions restarting per example.
    ids = torch.cat([torch.cat([torch.full((N,), 7), t]) for t in texts])[None]
    positions = torch.cat([torch.arange(N + len(t)) for t in texts])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, attention_mask=block_causal_mask(positions, torch.float32)).logits
        start = 0
        for t in texts:
            alone = model(input_ids=t[None]).logits  # plain call: the prompt goes in front, its logits are dropped
            assert alone.shape[1] == len(t)
            torch.testing.assert_close(packed[:, start + N : start + N + len(t)], alone, atol=1e-5, rtol=1e-5)
            start += N + len(t)
    # And the prompt matters: another prompt gives other logits.
    other, _ = _soft_prompt_model(tiny_gptj, seed=1)
    with torch.no_grad():
        assert (other.eval()(input_ids=texts[-1][None]).logits - alone).abs().max() > 1e-3


def test_a_prompt_from_text_is_that_text_in_front_and_gradients_reach_only_the_prompt(tiny_gptj):
    model, tokenizer = load_tiny(tiny_gptj, "auto")
    text = "Once upon a time"
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(prefix)
    method = PromptTuningMethod(kind="prompt_tuning", num_virtual_tokens=n, init_text=text)
    soft = SoftPromptModel(model.requires_grad_(False), initial_prompt(model, method, tokenizer, 0)).eval()
    longer = initial_prompt(model, method.model_copy(update={"num_virtual_tokens": n + 2}), tokenizer, 0)
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(longer, embeddings[prefix + prefix[:2]])  # repeated to fill
    x = torch.tensor([[11, 42, 99, 5, 17]])
    with torch.no_grad():
        expected = model(input_ids=torch.cat([torch.tensor([prefix]), x], 1)).logits[:, n:]
        torch.testing.assert_close(soft(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
    soft.train()
    soft(input_ids=x).logits.sum().backward()
    assert soft.prompt.grad is not None and soft.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RecipeError, match="method.init_text '' has no tokens|init_text"):
        initial_prompt(model, PromptTuningMethod(kind="prompt_tuning", num_virtual_tokens=2, init_text=" "), _NoTokens(), 0)


class _NoTokens:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": []}


def test_saved_prompt_loads_in_peft_with_the_same_logits_and_generates_like_a_forward_loop(tiny_gptj, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = _soft_prompt_model(tiny_gptj)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gptj), tmp_path / "adapter").eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ours = model(input_ids=x).logits
        theirs = peft_model(input_ids=x).logits  # peft's include the prompt's positions
        assert theirs.shape[1] == N + x.shape[1]
        torch.testing.assert_close(theirs[:, N:], ours, atol=1e-5, rtol=1e-5)
        reloaded = SoftPromptModel.from_saved(AutoModelForCausalLM.from_pretrained(tiny_gptj), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
        # Greedy generation (KV cache) equals a loop of whole forwards, rows of the batch alike.
        x = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(3))
        expected = x
        for _ in range(8):
            expected = torch.cat([expected, model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("softrun")
    recipe = small_recipe(tmp, method="prompt_tuning", steps=30, save_every=10, lr=3e-2, name="soft.yaml",
                          method_extra="num_virtual_tokens: 8")  # fmt: skip
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prompt_tuning on tiny-gptj: 512 trainable" in result.stdout  # 8 vectors of width 64
    return tmp / "run"


def _held_out_loss(run, model) -> float:
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from gptj_tune.data import prepare_data
    from gptj_tune.data.batches import Batches
    from gptj_tune.train.step import evaluate_loss

    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    data = prepare_data(recipe.data, tokenizer, recipe.prompt_slots())
    assert all(list(row.input_ids[:8]) == [tokenizer.eos_token_id] * 8 for row in data.eval_rows)  # each row starts with slots
    return evaluate_loss(model, Batches(data.eval_rows, 8, tokenizer.pad_token_id, 0, shuffle=False), Accelerator(cpu=True))


@pytest.mark.slow
def test_a_prompt_tuning_run_learns_the_prompt_alone_and_resumes_on_its_curve(soft_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = load_file(soft_run / "final" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (8, 64)
    recipe = load_recipe(soft_run / "recipe.yaml")
    base = AutoModelForCausalLM.from_pretrained(soft_run / "base-model")
    start = initial_prompt(base, recipe.method, AutoTokenizer.from_pretrained(soft_run / "final"), recipe.train.seed)
    before = _held_out_loss(soft_run, SoftPromptModel(base, start))
    after = _held_out_loss(soft_run, SoftPromptModel.from_saved(base, soft_run / "final"))
    assert after < before - 0.2, (before, after)  # measured: 6.35 -> 5.94
    summary = json.loads((soft_run / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(after, rel=1e-5)  # the run's own figure, same slots and masks

    # Resumed from step 20, the run logs the same losses to the end.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(soft_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-30")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    resumed = cli("run", str(copy / "recipe.yaml"), "--resume", "--set", f"output.dir={copy}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > 20}

    assert losses(copy) and losses(copy) == pytest.approx(losses(soft_run), rel=1e-5)


@pytest.mark.slow
def test_export_writes_the_peft_adapter_and_generate_and_eval_use_it(soft_run, tmp_path, shared_data):
    out = tmp_path / "export"
    exported = cli("export", str(soft_run), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "nothing is merged" in exported.stdout and "verified" in exported.stdout  # reloaded by stock peft
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    assert "soft prompt" in (out / "README.md").read_text()

    answer = cli("generate", str(out), "--prompt", "reverse: a b c", "--max-new-tokens", "6")
    assert answer.returncode == 0, answer.stderr[-2000:]

    report = tmp_path / "report"
    evaluated = cli("eval", str(soft_run), "--tasks", "lambada_openai", "--limit", "4", "--data-dir",
                    str(shared_data / "benchmarks"), "--out", str(report))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    data = json.loads((report / "report.json").read_text())
    summary = json.loads((soft_run / "summary.json").read_text())
    assert data["held_out"]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert data["comparison"]["held_out"]["loss"] > data["held_out"]["loss"]  # the base model, no prompt slots
    assert "lambada_openai" in data["benchmarks"]


def test_lm_eval_scores_a_prompt_from_text_as_the_base_model_with_that_text_in_front(tiny_gptj, shared_data, tmp_path):
    """lm-eval slices the logits it is given by input position: the soft prompt's must not shift them."""
    from gptj_tune.evaluate.harness import prepare_tasks, run_benchmarks_in_memory

    model, tokenizer = load_tiny(tiny_gptj, "auto")
    model.eval()
    prefix = torch.tensor(tokenizer("Once upon a time", add_special_tokens=False)["input_ids"])
    method = PromptTuningMethod(kind="prompt_tuning", num_virtual_tokens=len(prefix), init_text="Once upon a time")
    soft = SoftPromptModel(model, initial_prompt(model, method, tokenizer, 0))

    class TextInFront(torch.nn.Module):  # the same model by other means: real tokens in front
        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        @property
        def device(self):
            return torch.device("cpu")

        def tie_weights(self):
            pass

        def forward(self, input_ids, **kwargs):
            ids = torch.cat([prefix.expand(input_ids.shape[0], -1), input_ids], 1)
            out = self.model(input_ids=ids)
            out.logits = out.logits[:, len(prefix) :]
            return out

    files = prepare_tasks(["lambada_openai", "piqa"], shared_data / "benchmarks", tmp_path / "tasks")
    ours = run_benchmarks_in_memory(soft, tokenizer, files, 6, 4, "cpu")["tasks"]
    reference = run_benchmarks_in_memory(TextInFront(), tokenizer, files, 6, 4, "cpu")["tasks"]
    for task, metrics in reference.items():
        for metric, (value, _) in metrics.items():
            assert ours[task][metric][0] == pytest.approx(value, rel=1e-4), (task, metric)


def test_prompt_tuning_recipe_errors_name_the_key_and_the_fix(tmp_path):
    base = "method: {kind: prompt_tuning, num_virtual_tokens: 20}\n"
    with pytest.raises(RecipeError, match=r"prompt_tuning .* set distributed.backend to single or ddp \(not deepspeed\)"):
        load_recipe(write_recipe(tmp_path / "a.yaml", base + "distributed: {backend: deepspeed, num_processes: 2}\n"))
    with pytest.raises(RecipeError, match=r"data.max_length 24 .*20-token soft prompt.*at least 28"):
        load_recipe(write_recipe(tmp_path / "b.yaml", base + "data: {max_length: 24}\n"))
    with pytest.raises(RecipeError, match=r"method.num_virtual_tokens"):
        load_recipe(write_recipe(tmp_path / "c.yaml", "method: {kind: prompt_tuning, num_virtual_tokens: 0}\n"))
    with pytest.raises(RecipeError, match=r"`method.r` \(line 1\): a setting of method.kind lora and qlora, not of prompt_tuning; remove it"):
        load_recipe(write_recipe(tmp_path / "d.yaml", "method: {kind: prompt_tuning, r: 8}\n"))
