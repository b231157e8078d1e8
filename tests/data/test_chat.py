"""Conversations (`format: chat`): the ids are what apply_chat_template gives, the targets are the
assistant replies and their EOS, bad records are file:line errors, and a tiny model learns the chat
demo with a tokenizer that carries its template through the export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import RECIPES, cli

from gptj_tune.data import prepare_data
from gptj_tune.data.chat import GPTJ_CHAT
from gptj_tune.data.formats import read_source
from gptj_tune.errors import DataError
from gptj_tune.recipe import DataSection, SourceSection

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
                  {"role": "assistant", "content": "Green, or red."}]},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"},
                       {"from": "human", "value": "Now in French."}, {"from": "gpt", "value": "Salut !"}]},
]  # fmt: skip


def messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]


def chat_section(tmp_path, records, **extra) -> DataSection:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataSection(sources=[SourceSection(format="chat", path=str(path))], packing=False, eval_fraction=0,
                       max_length=256, cache_dir=str(tmp_path / "cache"), **extra)  # fmt: skip


def test_examples_are_apply_chat_template_ids_and_the_targets_are_the_replies(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer

    data = prepare_data(chat_section(tmp_path, CONVERSATIONS), gpt2_tokenizer)
    gpt2_tokenizer.chat_template = GPTJ_CHAT
    gpt2_tokenizer.save_pretrained(tmp_path / "tok")  # what final/ and the export hold
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")  # plain transformers, nothing of ours
    assert len(data.train_rows) == len(CONVERSATIONS)  # a conversation is one example, kept whole
    for row, record in zip(data.train_rows, CONVERSATIONS):
        turns = messages(record)
        assert row.input_ids.tolist() == plain.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
        replies = "".join(m["content"] + "<|endoftext|>" for m in turns if m["role"] == "assistant")
        assert gpt2_tokenizer.decode(row.input_ids[row.labels != -100]) == replies
        # the prompt of the last reply, with the generation prompt, is the row up to that reply
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        prompt = plain.apply_chat_template(turns[:last], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert row.input_ids.tolist()[: len(prompt)] == prompt and row.labels[len(prompt)] != -100
        assert row.labels[len(prompt) - 1] == -100
    packed = prepare_data(chat_section(tmp_path, CONVERSATIONS * 4).model_copy(update={"packing": True}), gpt2_tokenizer)
    assert len(packed.train_rows) < len(CONVERSATIONS) * 4  # several conversations a row, each whole
    found = []
    for row in packed.train_rows:
        starts = [i for i, p in enumerate(row.position_ids.tolist()) if p == 0] + [len(row.input_ids)]
        found += [row.input_ids[a:b].tolist() for a, b in zip(starts, starts[1:])]
    expected = [plain.apply_chat_template(messages(r), tokenize=True, return_dict=True)["input_ids"] for r in CONVERSATIONS * 4]
    assert sorted(found) == sorted(expected)


def test_openai_weights_content_parts_and_a_sharegpt_system_field(tmp_path, gpt2_tokenizer):
    """OpenAI's fine-tuning format: an assistant turn with `weight: 0` stays in the context but is not
    learned from (nor the held-out reference), and `content` may be a list of text parts."""
    record = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Bleu.", "weight": 0},
        {"role": "user", "content": "In English?"}, {"role": "assistant", "content": [{"type": "text", "text": "Blue."}], "weight": 1},
        {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome.", "weight": 0}]}  # fmt: skip
    plain = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"]) if isinstance(m["content"], list) else m["content"]}
             for m in record["messages"]]  # fmt: skip
    data = prepare_data(chat_section(tmp_path, [record]), gpt2_tokenizer)
    [row] = data.train_rows
    gpt2_tokenizer.chat_template = GPTJ_CHAT
    assert row.input_ids.tolist() == gpt2_tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"]
    assert "You are terse." in gpt2_tokenizer.decode(row.input_ids)
    assert gpt2_tokenizer.decode(row.input_ids[row.labels != -100]) == "Blue.<|endoftext|>"  # the weight-1 reply alone
    sharegpt = {"system": "You are terse.", "conversations": [{"from": "human", "value": "Name a colour."},
                                                              {"from": "gpt", "value": "Blue."}]}  # fmt: skip
    (tmp_path / "sharegpt").mkdir()
    [row] = prepare_data(chat_section(tmp_path / "sharegpt", [sharegpt]), gpt2_tokenizer).train_rows
    assert gpt2_tokenizer.decode(row.input_ids).startswith("You are terse.")  # its top-level system prompt, first
    held = prepare_data(chat_section(tmp_path, [record] * 4).model_copy(update={"eval_fraction": 0.25, "eval_max": 1}), gpt2_tokenizer)
    assert [r["output"] for r in held.eval_records] == ["Blue."]  # the last reply learned from is the reference


def test_train_on_prompt_and_a_recipes_own_template(tmp_path, gpt2_tokenizer):
    own = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
           "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    data = prepare_data(chat_section(tmp_path, CONVERSATIONS[:2], chat_template=own), gpt2_tokenizer)
    row = data.train_rows[1]
    assert gpt2_tokenizer.decode(row.input_ids) == "<user>What is 2 + 2?\n<assistant>4<|endoftext|>\n"
    assert gpt2_tokenizer.decode(row.input_ids[row.labels != -100]) == "4<|endoftext|>\n"  # the template's turn, as it renders it
    everything = prepare_data(chat_section(tmp_path, CONVERSATIONS[:2], train_on_prompt=True), gpt2_tokenizer)
    row = everything.train_rows[1]
    assert (row.labels[1:] != -100).all() and row.labels[0] == -100


@pytest.mark.parametrize("line, message", [
    ({"text": "hi"}, "a chat record needs `messages` (role/content) or `conversations` (from/value)"),
    ({"messages": []}, "`messages` must be a non-empty list of turns"),
    ({"messages": [{"content": "hi"}]}, "`messages[0]` has no `role`"),
    ({"messages": [{"role": "user"}]}, "`messages[0]` has no `content`"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "`messages[0]`: unknown role 'robot'; expected system, user, assistant or tool"),
    ({"messages": [{"role": "user", "content": 3}]}, "`messages[0]`: `content` must be a string (or a list of text parts), got int"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "a"}]},
     "`messages[0]`: `content`[0] is a 'image_url' part: gptj-tune trains on text only (set data.on_bad_record: skip"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]},
     "`messages[0]`: `content`[0] is not a text part ({type: text, text: \"...\"})"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "`messages[1]`: `weight` must be 0 (not learned from) or 1, got 2"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "every assistant turn has `weight` 0, so nothing to learn from"),
    ({"system": "Be brief.", "messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "a"}]},
     "both a `system` field and a system turn; keep one"),
    ({"system": 3, "conversations": [{"from": "gpt", "value": "a"}]}, "`system` must be a string (or a list of text parts), got int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
    ({"conversations": [{"from": "human", "value": "hi"}, "oops"]}, "`conversations[1]` must be an object with `from` and `value`"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "a"}]},  # JSON's "\ud800"
     "`messages[0]`: `content` holds '\\ud800' at character 4, half of a UTF-16 surrogate pair and not text"),
])  # fmt: skip
def test_a_bad_conversation_is_a_file_line_error_or_skipped_and_counted(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert_second_record_is_bad(tmp_path, good, line, message)


def assert_second_record_is_bad(tmp_path, good: dict, bad: dict, message: str) -> None:
    """A chat file of `good` then `bad`: line 2 is a file:line error holding `message` under
    on_bad_record: fail, and is skipped and counted under skip, `good` read."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    source = SourceSection(format="chat", path=str(path))
    with pytest.raises(DataError) as raised:
        read_source(source, 0, "fail")
    assert str(raised.value).startswith(f"{path}:2: ") and message in str(raised.value)
    read = read_source(source, 0, "skip")
    assert len(read.records) == 1 and len(read.skipped) == 1 and message in read.skipped[0]


def test_conversations_encoded_many_at_a_time_match_one_at_a_time(gpt2_tokenizer):
    """ChatEncoder (the texts tokenized together with tiktoken, targets from byte offsets) gives what
    chat_ids gives from the tokenizer's offsets, on replies with accents, CJK, emoji and a written-out
    `<|endoftext|>`, a `weight` 0 reply, a reply first, a recipe's own template, train_on_prompt; and
    an encoder whose offsets are wrong is caught by its first batch, which then goes the slow way."""
    from gptj_tune.data.chat import chat_ids, messages_of
    from gptj_tune.data.chat_encode import ChatEncoder
    from gptj_tune.data.encode import encoder, token_byte_lengths

    more = [
        {"messages": [{"role": "user", "content": "Café? 東京🙂"}, {"role": "assistant", "content": " naïve — «oui» 🙂\n"},
                      {"role": "user", "content": "and <|endoftext|> inside"}, {"role": "assistant", "content": "ok<|endoftext|>ok"}]},
        {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Fine."},
                      {"role": "assistant", "content": "Not learned.", "weight": 0}, {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "  spaced  "}]},
    ]  # fmt: skip
    conversations = [{"messages": messages_of(r, "x")} for r in CONVERSATIONS + more] * 3
    own = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
           "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    encode, name = encoder(gpt2_tokenizer)
    lengths = token_byte_lengths(gpt2_tokenizer)
    assert name == "tiktoken" and lengths is not None
    for template in (GPTJ_CHAT, own):
        for train_on_prompt in (False, True):
            chats = ChatEncoder(gpt2_tokenizer, template, train_on_prompt, encode, lengths)
            got = chats(conversations)
            assert chats.fast  # its first batch agreed with chat_ids, so it stays on the fast way
            for (ids, targets), chat in zip(got, conversations):
                want_ids, want_targets = chat_ids(gpt2_tokenizer, template, chat["messages"], train_on_prompt)
                assert ids.tolist() == want_ids and targets.tolist() == want_targets
    wrong = np.ones_like(lengths)  # every token one byte long: the targets land in the wrong places
    chats = ChatEncoder(gpt2_tokenizer, GPTJ_CHAT, False, encode, wrong)
    got = chats(conversations)
    assert not chats.fast
    assert [t.tolist() for _, t in got] == [chat_ids(gpt2_tokenizer, GPTJ_CHAT, c["messages"], False)[1] for c in conversations]


def test_a_reply_that_opens_a_conversation_is_learned_after_its_header(gpt2_tokenizer):
    """A reply with nothing before it was learned from the text's start: its header, and the tools
    when they come first, were targets. Now only the reply and what ends it are, with the built-in
    template (also in its Python rendering) and with a recipe's own template that writes a default
    system prompt; a template that loses the mark in the reply's text keeps the old way."""
    from gptj_tune.data.chat import assistant_spans, chat_ids
    from gptj_tune.data.gptj_chat import gptj_chat_spans

    eos = gpt2_tokenizer.eos_token
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]  # fmt: skip
    default_system = ("{% if messages[0]['role'] != 'system' %}<system>Be kind.\n{% endif %}{% for m in messages %}"
                      "<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
                      "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    for template, offered, ends in ((GPTJ_CHAT, tools, eos), (GPTJ_CHAT, None, eos), (default_system, None, eos + "\n")):
        text, spans = assistant_spans(gpt2_tokenizer, template, messages, offered)
        assert spans[0][0] > 0 and [text[a:b] for a, b in spans] == ["I speak first." + ends, "Hello." + ends]
        if template is GPTJ_CHAT:
            assert gptj_chat_spans(messages, offered, eos) == (text, spans)
        ids, targets = chat_ids(gpt2_tokenizer, template, messages, False, offered)
        assert gpt2_tokenizer.decode([i for i, t in zip(ids, targets) if t]) == "I speak first." + ends + "Hello." + ends
    clipped = default_system.replace("m['content']", "m['content'][:4]")
    text, spans = assistant_spans(gpt2_tokenizer, clipped, messages)
    assert spans[0][0] == 0 and text.startswith("<system>Be kind.\n<assistant>I sp")


def test_a_held_out_conversation_whose_reference_opens_it_is_prompted_by_its_header(tmp_path, gpt2_tokenizer):
    """When the last reply learned from is the first turn (later replies `weight` 0), the held-out
    prompt is what the template writes before that reply; the build failed on it, as transformers
    refuses to render the empty conversation before it."""
    record = {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Not learned.", "weight": 0}]}  # fmt: skip
    section = chat_section(tmp_path, CONVERSATIONS + [record] * 3).model_copy(update={"eval_fraction": 0.5})
    data = prepare_data(section, gpt2_tokenizer)
    held = [r for r in data.store.meta["eval_records"] if r["output"] == "I speak first."]
    assert held and all(r["prompt_text"] == "### Assistant:\n" for r in held)


def test_a_source_names_its_own_turn_field_keys_and_role_names(tmp_path, gpt2_tokenizer):
    """lmsys-chat-1m keeps its turns in `conversation`, OASST calls the user `prompter`, other dumps
    use their own keys: `messages_field`, `role_field`/`content_field` and `roles` read them as the
    same conversations, so the same ids and targets."""
    renamed = {"system": "speaker", "user": "prompter", "assistant": "Bot"}
    custom = [{"dialog": [{"speaker": renamed[m["role"]], "text": m["content"]} for m in messages(r)]} for r in CONVERSATIONS]
    lmsys = [{"conversation": messages(r), "model": "vicuna-13b"} for r in CONVERSATIONS]
    reference = prepare_data(chat_section(tmp_path / "a", CONVERSATIONS), gpt2_tokenizer)
    for records, options in ((custom, dict(messages_field="dialog", role_field="speaker", content_field="text",
                                           roles={"system": "speaker", "user": ["prompter"], "assistant": ["bot"]})),
                             (lmsys, dict(messages_field="conversation"))):  # fmt: skip
        folder = tmp_path / options["messages_field"]
        section = chat_section(folder, records)
        section = section.model_copy(update={"sources": [SourceSection(format="chat", path=section.sources[0].path, **options)]})
        data = prepare_data(section, gpt2_tokenizer)
        assert [r.input_ids.tolist() for r in data.train_rows] == [r.input_ids.tolist() for r in reference.train_rows]
        assert [r.labels.tolist() for r in data.train_rows] == [r.labels.tolist() for r in reference.train_rows]
    # a name given in `roles` wins over the built-in one: `model` read as the user's turn here
    record = {"messages": [{"role": "model", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "model.jsonl"
    path.write_text(json.dumps(record) + "\n")
    read = read_source(SourceSection(format="chat", path=str(path), roles={"user": "MODEL"}), 0, "fail")
    assert [m["role"] for m in read.records[0]["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("options, line, message", [
    ({}, {"messages": [{"role": "prompter", "content": "hi"}]},
     "unknown role 'prompter'; expected system, user, assistant or tool (ShareGPT: system, human, gpt, function_call, "
     "observation), or a name in "
     "data.sources[0].roles, e.g. roles: {user: [prompter]}"),
    ({}, {"text": "hi"}, "or set data.sources[0].messages_field to the field holding the turns; fields present: text"),
    ({"messages_field": "dialog"}, {"messages": [{"role": "user", "content": "hi"}]},
     "a chat record needs `dialog` (its turns: set data.sources[0].messages_field to the field that holds them); fields present: messages"),
    ({"content_field": "text"}, {"messages": [{"role": "user", "content": "hi"}]},
     "`messages[0]` has no `text` (keys present: role, content; data.sources[0].content_field names the key)"),
])  # fmt: skip
def test_a_record_that_does_not_fit_the_sources_fields_names_the_setting(tmp_path, options, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError) as raised:
        read_source(SourceSection(format="chat", path=str(path), **options), 0, "fail")
    assert str(raised.value).startswith(f"{path}:1: ") and message in str(raised.value)


@pytest.mark.parametrize("options, message", [
    ({"format": "alpaca", "messages_field": "dialog"}, "`messages_field` only applies to format chat"),
    ({"format": "alpaca", "roles": {"user": ["prompter"]}}, "`roles` only applies to format chat"),
    ({"format": "chat", "roles": {"user": ["bot"], "assistant": ["Bot"]}}, "'Bot' is named for both user and assistant; keep one"),
    ({"format": "chat", "roles": {"user": []}}, "`roles.user` is empty"),
    ({"format": "chat", "roles": {"tool_call": ["call"]}}, "roles.tool_call"),
    ({"format": "chat", "messages_field": ""}, "messages_field"),
])  # fmt: skip
def test_chat_field_settings_are_checked_in_the_recipe(tmp_path, options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        SourceSection(path=str(tmp_path), **options)
    assert message in str(raised.value)


def test_learn_replies_last_learns_only_the_last_reply_and_keeps_the_rest_as_context(tmp_path, gpt2_tokenizer):
    every = prepare_data(chat_section(tmp_path / "all", CONVERSATIONS), gpt2_tokenizer)
    last = prepare_data(chat_section(tmp_path / "last", CONVERSATIONS, learn_replies="last"), gpt2_tokenizer)
    for row, all_row, record in zip(last.train_rows, every.train_rows, CONVERSATIONS):
        replies = [m["content"] for m in messages(record) if m["role"] == "assistant"]
        assert row.input_ids.tolist() == all_row.input_ids.tolist()  # the same conversation, earlier replies in it
        assert gpt2_tokenizer.decode(row.input_ids[row.labels != -100]) == replies[-1] + "<|endoftext|>"
        assert gpt2_tokenizer.decode(all_row.input_ids[all_row.labels != -100]) == "".join(r + "<|endoftext|>" for r in replies)


@pytest.mark.parametrize("extra, message", [
    (dict(learn_replies="last", train_on_prompt=True), "data.learn_replies: last and train_on_prompt: true contradict each other"),
    (dict(learn_replies="last", sources=[SourceSection(format="alpaca", path="x.json")]), "applies to chat sources"),
])  # fmt: skip
def test_learn_replies_last_is_checked_against_the_rest_of_the_data_section(tmp_path, extra, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        DataSection(**{"sources": [SourceSection(format="chat", path=str(tmp_path))], **extra})


def test_the_chat_field_settings_are_part_of_the_store_key(tmp_path, gpt2_tokenizer):
    from gptj_tune.data.cache import cache_key

    plain = chat_section(tmp_path, CONVERSATIONS)
    named = plain.model_copy(update={"sources": [SourceSection(format="chat", path=plain.sources[0].path, messages_field="messages")]})
    renamed = plain.model_copy(update={"sources": [SourceSection(format="chat", path=plain.sources[0].path, roles={"user": ["prompter"]})]})
    last = plain.model_copy(update={"learn_replies": "last"})
    keys = {cache_key(s, gpt2_tokenizer, 0) for s in (plain, named, renamed, last)}
    assert len(keys) == 4
    # left at their defaults they are not in the key at all, so stores built before them keep theirs
    from gptj_tune.data.cache import _data_spec

    spec = _data_spec(plain)
    assert "learn_replies" not in spec and not {"messages_field", "role_field", "content_field", "roles"} & set(spec["sources"][0])


@pytest.mark.slow
def test_the_chat_demo_learns_and_its_export_carries_the_template(tmp_path):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    result = cli("run", str(RECIPES / "chat-quickstart.yaml"), "--set", "data.sources.0.count=2000", "--set", "train.max_steps=120",
                 "--set", "eval.every_steps=60", "--set", "eval.generate_samples=20", "--set", f"output.dir={run}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert any("exact_match" in m for m in lines)
    out = tmp_path / "export"
    exported = cli("export", str(run), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    conversation = [{"role": "system", "content": "You answer in as few words as the task needs."},
                    {"role": "user", "content": "What is the last word?\ncake tent iron"},
                    {"role": "assistant", "content": "iron"}, {"role": "user", "content": "Reverse the order of the words.\nfish oak"}]  # fmt: skip
    for folder in (run / "final", out):
        plain = AutoTokenizer.from_pretrained(folder)
        text = plain.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert text.endswith("### User:\nReverse the order of the words.\nfish oak\n\n### Assistant:\n") and "iron<|endoftext|>" in text
    chat = cli("generate", str(run), "--chat", input="What is the last word? cake tent iron\nAnd the first?\n\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    from gptj_tune.generate import Generator

    generator = Generator(str(out), max_new_tokens=8)  # the export: its tokenizer's template drives the conversation
    first = generator.chat_turn("Write the words in capital letters.\ncake tent")
    generator.chat_turn("Reverse the order of the words.\nfish oak")
    assert [m["role"] for m in generator.history] == ["user", "assistant", "user", "assistant"]
    assert generator.history[1]["content"] == first and first.strip()
    # --system: some of the demo's conversations open with this system turn
    system = "You answer in as few words as the task needs."
    with_system = Generator(str(out), max_new_tokens=8, system=system)
    with_system.chat_turn("What is the last word?\ncake tent iron")
    assert with_system.history[0] == {"role": "system", "content": system} and [m["role"] for m in with_system.history[1:]] == ["user", "assistant"]
    chat = cli("generate", str(run), "--chat", "--system", system, input="What is the last word? cake tent iron\n\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    # a template that refuses a system turn (as some models' do): each turn says why, the chat goes on
    refusing = tmp_path / "refusing"
    shutil.copytree(out, refusing)
    assert (refusing / "chat_template.jinja").is_file()
    (refusing / "chat_template.jinja").write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
                                                  "not supported') }}{% endif %}" + GPTJ_CHAT)  # fmt: skip
    chat = cli("generate", str(refusing), "--chat", "--system", system, input="cake tent iron\nfish oak\n\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("the chat template could not render this conversation: TemplateError: System role not "
                             "supported") == 2  # fmt: skip
    assert "Traceback" not in chat.stdout + chat.stderr


@pytest.mark.slow
def test_the_gptj_chat_recipe_runs_on_conversations_with_a_tiny_model(tmp_path, shared_data):
    """The shipped GPT-J-6B chat recipe, a tiny model in its place, on the Dolly sample as conversations."""
    rows = [json.loads(line) for line in (shared_data / "dolly" / "dolly_sample_train20.jsonl").read_text().splitlines()]
    folder = tmp_path / "conversations"
    folder.mkdir()
    (folder / "dolly.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["instruction"] + ("\n" + r["context"] if r["context"] else "")},
        {"role": "assistant", "content": r["response"]}]}) + "\n" for r in rows))  # fmt: skip
    result = cli("run", str(RECIPES / "gptj-chat-lora.yaml"), "--set", "model.name_or_path=tiny-gptj", "--set", "model.revision=null",
                 "--set", "model.dtype=float32", "--set", "model.gradient_checkpointing=false", "--set", "model.tiny.layers=2",
                 "--set", f"data.sources.0.path={folder}", "--set", "data.max_length=256", "--set", "train.epochs=null",
                 "--set", "train.max_steps=3", "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "train.warmup_steps=1",
                 "--set", "train.save_every=3", "--set", "eval.generate_samples=2", "--set", f"output.dir={tmp_path / 'run'}")  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "### Assistant:" in (tmp_path / "run" / "final" / "chat_template.jinja").read_text() or \
        "### Assistant:" in (tmp_path / "run" / "final" / "tokenizer_config.json").read_text()  # fmt: skip
