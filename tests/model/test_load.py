"""Models: the built-in tiny GPT-J, GPT-J tokenizer facts, LoRA targets, and exact packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SPEED_SHAPE_ARGS, cli, save_tiny_gpt_neo, write_recipe

from gptj_tune.model.attention import block_causal_mask
from gptj_tune.data.templates import BUILTIN_TEMPLATES
from gptj_tune.data.batches import collate
from gptj_tune.data.pack import make_rows
from gptj_tune.data.tokens import IGNORE, tokenize_instructions
from gptj_tune.errors import ModelError
from gptj_tune.model.methods import apply_method, count_parameters
from gptj_tune.model.load import build_tiny_gptj, load_model_and_tokenizer
from gptj_tune.recipe import FullMethod, LoraMethod, ModelSection, TinyModelSection

SMALL = TinyModelSection(**SPEED_SHAPE_ARGS)


@pytest.fixture(scope="module")
def tiny(tiny_gptj):
    return tiny_gptj, ModelSection(tiny=SMALL)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, shared_data):
    """A tiny GPT-J around the real GPT-2 tokenizer, with GPT-J's 50400-row embedding."""
    out = tmp_path_factory.mktemp("tiny-gpt2") / "model"
    section = ModelSection(tiny=SMALL, tokenizer=str(shared_data / "gpt2-tokenizer"))
    build_tiny_gptj(section, out)
    return load_model_and_tokenizer(section, str(out))


def test_tiny_build_is_deterministic_and_loads_with_from_pretrained(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTJForCausalLM

    out, section = tiny
    again = tmp_path / "again"
    build_tiny_gptj(section, again)
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GPTJForCausalLM) and model.config.n_layer == 2 and model.config.rotary_dim == 8
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == model.config.eos_token_id
    text = "Sort: 3 1 2 — ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips
    assert len(tok("Reverse the order of the words.")["input_ids"]) <= 8  # trained on the demo data


def test_gptj_tokenizer_facts(tiny_gpt2):
    model, tok = tiny_gpt2
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    assert model.get_input_embeddings().weight.shape[0] == 50400  # GPT-J's padded embedding is never shrunk


def test_lora_targets_default_and_all_linear(tiny):
    out, section = tiny
    model, _ = load_model_and_tokenizer(section, str(out))
    peft_model = apply_method(model, LoraMethod(kind="lora", r=4))
    adapted = {name.split(".")[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}
    trainable, total = count_parameters(peft_model)
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) and trainable < total
    model, _ = load_model_and_tokenizer(section, str(out))
    all_linear = apply_method(model, LoraMethod(kind="lora", r=4, target_modules="all-linear"))
    assert {n.split(".")[-1] for n, m in all_linear.named_modules() if hasattr(m, "lora_A")} == adapted
    model, _ = load_model_and_tokenizer(section, str(out))
    full = apply_method(model, FullMethod(kind="full"))
    assert count_parameters(full)[0] == count_parameters(full)[1]


def test_unknown_family_needs_explicit_targets(tiny):
    from gptj_tune.model.load import lora_targets

    assert lora_targets("gpt_neo") == ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]
    with pytest.raises(ModelError, match="set method.target_modules"):
        lora_targets("llama")


@pytest.fixture(scope="module")
def gpt_neo_folder(tiny, tmp_path_factory):
    """A tiny GPT-Neo saved like a hub checkpoint (local + global layers, a 32-token window),
    with the tiny tokenizer."""
    from transformers import AutoTokenizer

    return save_tiny_gpt_neo(tmp_path_factory.mktemp("gpt-neo") / "model", AutoTokenizer.from_pretrained(tiny[0]))


def test_gpt_neo_packed_rows_keep_the_local_window(gpt_neo_folder):
    """Two examples longer than GPT-Neo's local window, packed in one row under our block-causal mask,
    get the logits each gets alone: the local layers still see only the last 32 tokens."""
    model, _ = load_model_and_tokenizer(ModelSection(name_or_path=str(gpt_neo_folder)), str(gpt_neo_folder))
    model.eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 500, (1, 60), generator=g), torch.randint(3, 500, (1, 50), generator=g)
    positions = torch.cat([torch.arange(60), torch.arange(50)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions,
                       attention_mask=block_causal_mask(positions, torch.float32)).logits  # fmt: skip
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
        unwindowed = model(input_ids=a, attention_mask=block_causal_mask(torch.arange(60)[None], torch.float32)).logits
    assert (packed - alone).abs().max() < 1e-5
    assert torch.equal(unwindowed, alone[:, :60])  # the mask did not replace the window
    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_pretrained(gpt_neo_folder, window_size=256).eval()  # the same weights, no window
    with torch.no_grad():
        assert (wide(input_ids=a).logits - alone[:, :60]).abs()[0, 40:].max() > 1e-3  # so the window matters here


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_gpt_neo_checkpoint_trains_from_a_recipe(tmp_path, gpt_neo_folder, method):
    import json

    from peft import PeftConfig

    recipe = write_recipe(tmp_path / "neo.yaml", f"""\
model: {{name_or_path: {gpt_neo_folder}}}
method: {{kind: {method}}}
data: {{sources: [{{format: synthetic, count: 600}}], template: plain, max_length: 128}}
train: {{lr: 1.0e-3, max_steps: 30, batch_size: 4, warmup_steps: 2, log_every: 5, save_every: 30, seed: 7}}
output: {{dir: {tmp_path / "run"}}}
""")
    result = cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = {x["step"]: x["loss"] for x in lines if "loss" in x}
    if method == "full":
        assert loss[30] < loss[5] - 0.3, loss
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.model_type == "gpt_neo"
    else:  # GPT-Neo's own module names got the adapters (no GPT-J names like fc_in)
        targets = set(PeftConfig.from_pretrained(tmp_path / "run" / "final").target_modules)
        assert targets == {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"}
    # The commands after `run` read the frozen recipe of a model that is not tiny-gptj (before, it
    # held the tiny section's defaults, which the schema refuses beside another model).
    exported = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "m"))
    assert exported.returncode == 0 and "verified" in exported.stdout, exported.stderr[-2000:]
    evaluated = cli("eval", str(tmp_path / "run"), "--tasks", "none")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    held_out = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["held_out"]["loss"]
    assert held_out == pytest.approx(json.loads((tmp_path / "run" / "summary.json").read_text())["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_targets_that_match_no_module_and_rows_past_the_context_are_refused(gpt_neo_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptj_tune.model.load import check_fits_context

    neo = AutoModelForCausalLM.from_pretrained(gpt_neo_folder)
    # GPT-J's MLP names on GPT-Neo: peft would adapt q_proj alone and train on without a word.
    with pytest.raises(ModelError, match=r"method.target_modules: 'fc_in', 'fc_out' matches no module of this gpt_neo model; .*c_fc, c_proj"):
        apply_method(neo, LoraMethod(kind="lora", r=4, target_modules=["q_proj", "fc_in", "fc_out"]))
    with pytest.raises(ModelError, match="method.modules_to_save: 'embed' matches no module.* wte"):
        apply_method(neo, LoraMethod(kind="lora", r=4, modules_to_save=["embed"]))
    check_fits_context(neo, 256)
    with pytest.raises(ModelError, match=r"data.max_length 512 is longer than the model's context \(256 positions\)"):
        check_fits_context(neo, 512)  # before: an index error deep in the position lookup
    recipe = write_recipe(tmp_path / "r.yaml", "model: {tiny: {context: 128}}\ndata: {sources: [{format: synthetic}], max_length: 256}\n")
    tiny_too_long = cli("validate", str(recipe))
    assert tiny_too_long.returncode == 2 and "data.max_length 256 is longer than the tiny model's context" in tiny_too_long.stderr
    neo_recipe = write_recipe(tmp_path / "neo.yaml", f"model: {{name_or_path: {gpt_neo_folder}}}\n"
                              f"data: {{sources: [{{format: synthetic}}], max_length: 512}}\noutput: {{dir: {tmp_path / 'run'}}}\n")  # fmt: skip
    neo_too_long = cli("run", str(neo_recipe))
    assert neo_too_long.returncode == 2 and "data.max_length 512 is longer than the model's context (256" in neo_too_long.stderr
    assert "Traceback" not in tiny_too_long.stderr + neo_too_long.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"'EleutherAI/gpt-j-6b' is not a local folder.*HF_HUB_OFFLINE is set"):
        load_model_and_tokenizer(ModelSection(name_or_path="EleutherAI/gpt-j-6b"), "EleutherAI/gpt-j-6b")
    # the download hint is today's CLI (`hf`, not the retired huggingface-cli), with the recipe's revision
    with pytest.raises(ModelError, match=r"`hf download EleutherAI/gpt-j-6b --revision float16 --local-dir DIR`"):
        load_model_and_tokenizer(ModelSection(name_or_path="EleutherAI/gpt-j-6b", revision="float16"), "EleutherAI/gpt-j-6b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="could not load the tokenizer from folder"):
        load_model_and_tokenizer(ModelSection(name_or_path=str(tmp_path / "empty")), str(tmp_path / "empty"))


def test_block_causal_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def _per_example_losses(model, rows, pad_id, pad_to, use_mask=True):
    """{example input_ids: mean token loss} computed from one forward pass over `rows`."""
    batch = collate(rows, pad_id, pad_to)
    # Without our mask: the plain call a naive loop makes (cache on by default, which turns off
    # transformers' packed-sequence detection).
    kwargs = {"attention_mask": block_causal_mask(batch["position_ids"], torch.float32), "use_cache": False} if use_mask else {}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    out = {}
    for j, row in enumerate(rows):
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:]):
            targets = batch["labels"][j, a + 1 : b] != IGNORE  # token t predicts label t+1 inside the example
            out[tuple(row.input_ids[a:b])] = float(token_loss[j, a : b - 1][targets].sum() / targets.sum())
    return out


def test_packed_loss_equals_unpacked_loss(shared_data, tiny_gpt2):
    from gptj_tune.data.formats import read_source
    from gptj_tune.recipe import SourceSection

    model, tok = tiny_gpt2
    model.eval()
    source = SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json"), limit=24)
    records = read_source(source, 0, "skip").records
    examples, _ = tokenize_instructions(records, tok, BUILTIN_TEMPLATES["alpaca"], 384, False, "truncate")
    packed_rows = make_rows(examples, 384, packing=True)
    assert len(packed_rows) < len(examples) / 2  # really packed, several examples per row
    packed = _per_example_losses(model, packed_rows, tok.pad_token_id, 384)
    unpacked = _per_example_losses(model, make_rows(examples, 384, packing=False), tok.pad_token_id, None)
    assert packed.keys() == unpacked.keys() and len(packed) == 24
    diffs = [abs(packed[k] - unpacked[k]) for k in packed]
    assert max(diffs) < 1e-5, max(diffs)
    # The explicit mask matters: a plain call lets packed examples see each other and the losses move.
    leaky = _per_example_losses(model, packed_rows, tok.pad_token_id, 384, use_mask=False)
    assert max(abs(leaky[k] - unpacked[k]) for k in packed) > 1e-3
