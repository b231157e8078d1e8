"""Held-out generation metrics: batched greedy answers are the answers each prompt gets alone."""

from __future__ import annotations

import pytest
import torch

from gptj_tune.data.synthetic import generate_records
from gptj_tune.data.templates import get_template
from gptj_tune.evaluate.heldout import exact_match, greedy_answers, rouge_l
from gptj_tune.model.load import build_tiny_gptj, load_model_and_tokenizer
from gptj_tune.recipe import ModelSection, TinyModelSection

TEMPLATE = get_template("plain")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    section = ModelSection(tiny=TinyModelSection(layers=2, width=64, heads=4, rotary_dim=8))
    build_tiny_gptj(section, out)
    model, tokenizer = load_model_and_tokenizer(section, str(out))
    return model.eval(), tokenizer


@torch.no_grad()
def _alone(model, tokenizer, record, max_new_tokens):
    """One prompt through plain `generate`, as a user would call it."""
    ids = tokenizer(TEMPLATE.render_prompt(record["instruction"], record["input"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in TEMPLATE.stop:
        text = text.split(stop)[0]
    return text.strip(), out.shape[1] - ids.shape[1]


def test_batched_answers_equal_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    records = generate_records(40, seed=3)
    lengths = [len(tokenizer(TEMPLATE.render_prompt(r["instruction"], r["input"]), add_special_tokens=False)["input_ids"]) for r in records]
    assert len(set(lengths)) > 3 and max(lengths.count(n) for n in lengths) > 3  # several groups, some batched

    # Make rows of one batch finish at different steps: the token one prompt generates third becomes
    # EOS, so that prompt stops after two tokens while others run on (and are padded after their EOS).
    first = records[lengths.index(max(set(lengths), key=lengths.count))]
    ids = tokenizer(TEMPLATE.render_prompt(first["instruction"], first["input"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    third = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)[0, -1]
    before = len(tokenizer)
    tokenizer.add_special_tokens({"eos_token": tokenizer.convert_ids_to_tokens(int(third))})  # special, as EOS is
    assert tokenizer.eos_token_id == int(third) and len(tokenizer) == before

    expected = [_alone(model, tokenizer, r, 12) for r in records]
    assert len({steps for _, steps in expected}) > 1, "every prompt generated the same number of tokens"
    # A budget of 3 prompts of ~30 tokens splits the larger groups into several batches.
    for budget in (8192, 3 * (max(lengths) + 12)):
        assert greedy_answers(model, tokenizer, TEMPLATE, records, 12, token_budget=budget) == [text for text, _ in expected]

    records[0]["output"] = expected[0][0]
    model.train()  # exact_match generates in eval mode and gives the model back as it found it
    scored = exact_match(model, tokenizer, TEMPLATE, records, 12)
    assert scored.correct >= 1 and scored.samples[0] == {**{k: records[0][k] for k in ("instruction", "input")},
                                                         "reference": records[0]["output"], "output": expected[0][0], "correct": True}  # fmt: skip
    assert model.training
    model.eval()


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat sat", "dog") == 0.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * (1.0 * 0.5) / 1.5)  # LCS 2: precision 1, recall 1/2
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_the_answer_ends_at_the_templates_stop_string():
    dolly = get_template("dolly")
    assert dolly.answer_in(" Paris.\n\n### End\n### Instruction: more") == "Paris."
    assert TEMPLATE.answer_in("  a ### End b \n") == "a ### End b"  # `plain` has no stop strings
