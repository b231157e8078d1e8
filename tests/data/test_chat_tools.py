"""Function calling in conversations (data/chat_tools.py): OpenAI's `tools`/`tool_calls`/`tool` and
ShareGPT's `function_call`/`observation` give the ids plain transformers' apply_chat_template gives
(with `tools=`), the calls are learned and the results are not, bad calls are file:line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_chat import assert_second_record_is_bad, chat_section
from test_chat_encode import as_lists

from gptj_tune.data import prepare_data
from gptj_tune.data.chat import GPTJ_CHAT, chat_ids, messages_of
from gptj_tune.data.chat_encode import ChatEncoder, ChatPool
from gptj_tune.data.chat_tools import tools_of
from gptj_tune.data.formats import read_source
from gptj_tune.recipe import SourceSection

WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
OPENAI = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "system", "content": "You help with the weather."},
        {"role": "user", "content": "Is it warm in Zürich and Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "17 C"},
        {"role": "assistant", "content": "Zürich 21 C, Paris 17 C."},
    ],
}  # fmt: skip
SHAREGPT = {  # LLaMA-Factory's layout: the tools and each call as JSON text
    "system": "You help with the weather.",
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Is it warm in Zürich and Paris?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Zürich"}},
                                                       {"name": "get_weather", "arguments": {"city": "Paris"}}])},
        {"from": "observation", "value": "21 C"},
        {"from": "observation", "value": "17 C"},
        {"from": "gpt", "value": "Zürich 21 C, Paris 17 C."},
    ],
}  # fmt: skip
LEGACY = {"messages": [  # OpenAI's older `function_call` and `function` role
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "Let me look.", "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
    {"role": "function", "name": "get_weather", "content": "3 C"},
    {"role": "assistant", "content": "3 C in Oslo."}]}  # fmt: skip
CALLS = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>\n'
         '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')  # fmt: skip


def transformers_form(city_calls: list[str]) -> list[dict]:
    """The calls as transformers' chat templates take them (arguments a dict, not JSON text)."""
    return [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in city_calls]


def test_tool_calls_give_apply_chat_template_ids_and_only_the_replies_are_learned(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer

    data = prepare_data(chat_section(tmp_path, [OPENAI, SHAREGPT, LEGACY]), gpt2_tokenizer)
    gpt2_tokenizer.chat_template = GPTJ_CHAT
    gpt2_tokenizer.save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")  # plain transformers, nothing of ours
    messages = [{"role": "system", "content": "You help with the weather."},
                {"role": "user", "content": "Is it warm in Zürich and Paris?"},
                {"role": "assistant", "tool_calls": transformers_form(["Zürich", "Paris"])},
                {"role": "tool", "content": "21 C"}, {"role": "tool", "content": "17 C"},
                {"role": "assistant", "content": "Zürich 21 C, Paris 17 C."}]  # fmt: skip
    openai, sharegpt, legacy = data.train_rows
    want = plain.apply_chat_template(messages, tools=[{"type": "function", "function": WEATHER}], tokenize=True,
                                     return_dict=True)["input_ids"]  # fmt: skip
    assert openai.input_ids.tolist() == want and sharegpt.input_ids.tolist() == want  # the two layouts: one conversation
    text = gpt2_tokenizer.decode(openai.input_ids)
    assert text.startswith("You help with the weather.\n\n### Tools:\n{\"name\": \"get_weather\", \"description\"")
    assert "### Tool result:\n21 C\n\n### Tool result:\n17 C\n\n### Assistant:\n" in text
    learned = gpt2_tokenizer.decode(openai.input_ids[openai.labels != -100])
    assert learned == CALLS + "<|endoftext|>Zürich 21 C, Paris 17 C.<|endoftext|>"  # the calls and the answer, no result
    assert gpt2_tokenizer.decode(legacy.input_ids[legacy.labels != -100]) == (
        'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|endoftext|>'
        "3 C in Oslo.<|endoftext|>")  # fmt: skip


def test_a_conversation_without_tools_renders_as_before_tools(gpt2_tokenizer):
    from gptj_tune.data.chat import render

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]  # fmt: skip
    assert render(gpt2_tokenizer, GPTJ_CHAT, turns, add_generation_prompt=True) == (
        "Be brief.\n\n### User:\nHi\n\n### Assistant:\nHello<|endoftext|>\n\n### User:\nBye\n\n### Assistant:\n")
    assert render(gpt2_tokenizer, GPTJ_CHAT, turns[1:3], tools=[{"type": "function", "function": {"name": "f"}}]) == (
        '### Tools:\n{"name": "f"}\n\n### User:\nHi\n\n### Assistant:\nHello<|endoftext|>')  # no system turn: the tools first


def test_a_held_out_tool_call_is_scored_as_the_template_writes_it(tmp_path, gpt2_tokenizer):
    calling = {"tools": OPENAI["tools"], "messages": OPENAI["messages"][:3]}  # the conversation ends on the calls
    section = chat_section(tmp_path, [calling] * 4).model_copy(update={"eval_fraction": 0.25, "eval_max": 1})
    [held] = prepare_data(section, gpt2_tokenizer).eval_records
    assert held["output"] == CALLS  # what greedy generation up to EOS must give for an exact match
    assert held["prompt_text"].endswith("Is it warm in Zürich and Paris?\n\n### Assistant:\n") and held["tools"]


def test_tools_travel_to_the_workers_and_the_fast_encoder_agrees(gpt2_tokenizer):
    chats = [{"messages": messages_of(r, "x"), "tools": tools_of(r, "x")} for r in (OPENAI, SHAREGPT, LEGACY)] * 40
    pool = ChatPool(ChatEncoder.of(gpt2_tokenizer, GPTJ_CHAT, False), workers=2, start_after=0)
    try:
        pool.start(wait=True)
        got = [pool.collect(t) for t in [pool.submit(chats[:60]), pool.submit(chats[60:])]]
        assert pool.in_workers > 0 and not pool.lost
    finally:
        pool.close()
    assert pool.local.fast  # its first list agreed with the offset mapping's ids and targets
    for (ids, targets), chat in zip([e for part in got for e in part], chats):
        want_ids, want_targets = chat_ids(gpt2_tokenizer, GPTJ_CHAT, chat["messages"], False, chat["tools"])
        assert ids.tolist() == want_ids and targets.tolist() == want_targets


def test_a_source_can_name_its_tool_role_and_a_result_may_be_a_json_object(tmp_path):
    path = tmp_path / "named.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": "",
        "tool_calls": transformers_form(["Oslo"]) + [{"function": {"name": "now", "arguments": None}}]},
        {"role": "Result", "content": {"degrees": 3, "sky": "grå"}}, {"role": "result", "content": "09:00"},
        {"role": "assistant", "content": "3 C."}]}) + "\n")  # fmt: skip
    read = read_source(SourceSection(format="chat", path=str(path), roles={"tool": ["result"]}), 0, "fail")
    messages = read.records[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    # a dict's arguments kept as given; a call without arguments has an empty object
    assert messages[1]["tool_calls"] == transformers_form(["Oslo"]) + [{"type": "function", "function": {"name": "now", "arguments": {}}}]
    assert messages[2]["content"] == '{"degrees": 3, "sky": "grå"}'  # the object as its JSON text
    assert "tools" not in read.records[0]  # no tools offered: none given to the template


def turns(*middle: dict) -> dict:
    return {"messages": [{"role": "user", "content": "Oslo?"}, *middle, {"role": "assistant", "content": "3 C."}]}


def call(arguments) -> dict:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


@pytest.mark.parametrize("line, message", [
    (turns(call("{\"city\": \"Oslo\"")), "`messages[1]`: `tool_calls[0]`: `arguments` is not valid JSON: Expecting ',' "
                                         "delimiter at character 15 of '{\"city\": \"Oslo\"'"),
    (turns(call("[1, 2]")), "`messages[1]`: `tool_calls[0]`: `arguments` must be a JSON object (name to value), got list"),
    (turns({"role": "assistant", "tool_calls": []}), "`messages[1]`: `tool_calls` must be a non-empty list of calls"),
    (turns({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}),
     "`messages[1]`: `tool_calls[0]` must be a call with a `name` (a string) and `arguments` (a JSON object)"),
    (turns({"role": "assistant", "tool_calls": [{"type": "code_interpreter", "function": {"name": "x"}}]}),
     "`messages[1]`: `tool_calls[0]` is a 'code_interpreter' call; only function calls can be trained on"),
    (turns({"role": "tool"}), "`messages[1]` has no `content`"),
    (turns({"role": "assistant"}), "`messages[1]` has no `content`"),
    ({**turns(), "tools": {"name": "x"}}, "`tools` must be a list of function schemas ({name, description, parameters}), got dict"),
    ({**turns(), "tools": "[{\"name\": "}, "`tools` is not valid JSON: Expecting value at character 10"),
    ({**turns(), "tools": [{"description": "no name"}]}, "`tools[0]` must be a function schema with a `name` (a string)"),
    ({**turns(), "tools": [{"type": "retrieval"}]}, "`tools[0]` is a 'retrieval' tool; only function tools can be trained on"),
    ({"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "function_call", "value": "get_weather(Oslo)"},
                        {"from": "gpt", "value": "3 C."}]},
     "`conversations[1]`: `value` is not valid JSON: Expecting value at character 0 of 'get_weather(Oslo)'"),
    ({"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "function_call", "value": "{\"arguments\": {}}"},
                        {"from": "gpt", "value": "3 C."}]},
     "`conversations[1]`: `value` must be a call with a `name` (a string) and `arguments` (a JSON object)"),
])  # fmt: skip
def test_a_bad_call_or_tool_is_a_file_line_error_or_skipped(tmp_path, line, message):
    assert_second_record_is_bad(tmp_path, OPENAI, line, message)


CITIES = ["Oslo", "Paris", "Lima", "Cairo", "Rome", "Bern", "Riga", "Dakar", "Seoul", "Tokyo"]


def weather_chats(count: int, seed: int) -> list[dict]:
    """A model learns to call get_weather with the city asked about, then to answer from the result
    (every other conversation ends on the call, as data that teaches only the calls does)."""
    import random

    rng = random.Random(seed)
    out = []
    for n in range(count):
        city, degrees = rng.choice(CITIES), rng.randrange(-9, 35)
        messages = [{"role": "user", "content": f"What is the weather in {city}?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                        "name": "get_weather", "arguments": json.dumps({"city": city})}}]}]  # fmt: skip
        if n % 2:
            messages += [{"role": "tool", "content": f"{degrees} C"}, {"role": "assistant", "content": f"{degrees} C in {city}."}]
        out.append({"tools": [WEATHER], "messages": messages})
    return out


@pytest.mark.slow
def test_a_tiny_model_learns_to_call_a_tool_and_generate_chat_offers_tools(tmp_path):
    """End to end on the tiny model: the loss falls on tool-calling conversations, and `generate
    --chat --tools` gives the model the tools, shows its call, and takes the result with `/tool`."""
    from conftest import RECIPES, cli

    import yaml

    chats = tmp_path / "weather.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in weather_chats(800, seed=1)))
    recipe = yaml.safe_load((RECIPES / "chat-quickstart.yaml").read_text())
    recipe["data"].update(sources=[{"format": "chat", "path": str(chats)}], max_length=384)  # ~290 tokens a conversation
    recipe["train"].update(max_steps=150, save_every=150, log_every=10)
    recipe["eval"].update(every_steps=150, generate_samples=10, max_new_tokens=96)  # a call is ~70 of the tiny BPE's tokens
    recipe["output"] = {"dir": str(tmp_path / "run")}
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("run", str(tmp_path / "tools.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert np.mean(losses[-3:]) < 0.4 * np.mean(losses[:3]), losses
    held = [m for m in lines if "exact_match" in m]
    assert held and held[-1]["exact_match"] > 0  # held-out replies (a call or an answer) generated word for word
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    chat = cli("generate", str(tmp_path / "run"), "--chat", "--tools", str(tools), "--max-new-tokens", "96",
               input="What is the weather in Rome?\n/tool 21 C\n\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    call, hint, answer = [line.removeprefix("> ") for line in chat.stdout.splitlines()][:3]  # each reply after the prompt's "> "
    assert call == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'), chat.stdout
    assert hint == "(a tool call: give its result as /tool RESULT)" and chat.stdout.count("(a tool call") == 1, chat.stdout
    # the result given with /tool is a tool turn: after one the model answers (after a user turn it calls)
    assert re.fullmatch(r"-?\d+ C in [A-Z][a-z]+\.", answer), chat.stdout


def random_conversation(rng) -> dict:
    """Any mix of the turns a build meets: system first or not, replies first, weights, calls with
    and without text, several calls, results, tools or none, text with accents, CJK and newlines."""
    words = ["Oslo", "grå", "東京", "🙂", "a\nb", "  ", "", "<|endoftext|>", "{\"x\": 1}", "### User:"]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(0, 4)))  # noqa: E731
    messages = [{"role": "system", "content": say()}] if rng.random() < 0.4 else []
    for _ in range(rng.randrange(1, 5)):
        kind = rng.choice(["user", "reply", "calls", "tool"])
        if kind == "calls":
            calls = [{"type": "function", "function": {"name": rng.choice(["f", "get_weather"]), "arguments": {"city": say()}}}
                     for _ in range(rng.randrange(1, 3))]  # fmt: skip
            messages.append({"role": "assistant", "content": rng.choice(["", say()]), "tool_calls": calls})
        elif kind == "reply":
            messages.append({"role": "assistant", "content": say()})
        else:
            messages.append({"role": kind, "content": say()})
        if messages[-1]["role"] == "assistant" and rng.random() < 0.2:
            messages[-1]["weight"] = 0
    tools = [{"type": "function", "function": {"name": "get_weather", "description": say()}}] if rng.random() < 0.5 else None
    return {"messages": messages, "tools": tools}


def test_the_python_gptj_chat_renders_what_the_jinja_template_renders(gpt2_tokenizer):
    import random

    from gptj_tune.data.chat import assistant_spans
    from gptj_tune.data.gptj_chat import gptj_chat_spans

    rng = random.Random(7)
    for _ in range(400):
        chat = random_conversation(rng)
        assert gptj_chat_spans(chat["messages"], chat["tools"], "<|endoftext|>") == \
            assistant_spans(gpt2_tokenizer, GPTJ_CHAT, chat["messages"], chat["tools"]), chat  # fmt: skip


def test_a_build_checks_the_python_gptj_chat_and_leaves_it_at_a_difference(gpt2_tokenizer):
    """ChatEncoder renders gptj-chat in Python after comparing it with Jinja on the first
    characters of the build; a copy that renders anything differently is dropped for Jinja's."""
    import random

    from gptj_tune.data.gptj_chat import gptj_chat_spans

    rng = random.Random(8)
    chats = [random_conversation(rng) for _ in range(300)]
    chats = [c for c in chats if any(m["role"] == "assistant" and m.get("weight", 1) for m in c["messages"])]
    want = [chat_ids(gpt2_tokenizer, GPTJ_CHAT, c["messages"], False, c["tools"]) for c in chats]
    encoder = ChatEncoder.of(gpt2_tokenizer, GPTJ_CHAT, False)
    assert encoder.python_render is not None  # the built-in template: rendered in Python
    encoder.render_unchecked = 5000  # compared on these first characters, then trusted (a build compares 200,000)
    assert as_lists(encoder(chats)) == [tuple(w) for w in want]
    assert encoder.python_render is not None and encoder.render_unchecked <= 0  # it agreed, so it stays
    wrong = ChatEncoder.of(gpt2_tokenizer, GPTJ_CHAT, False)
    wrong.python_render = lambda m, t: gptj_chat_spans(m, t, "</s>")  # a copy with another end marker
    assert as_lists(wrong(chats)) == [tuple(w) for w in want]
    assert wrong.python_render is None  # dropped at its first difference
    # past the first characters, the first conversation of each new kind is still compared
    blind = ChatEncoder.of(gpt2_tokenizer, GPTJ_CHAT, False)
    blind.render_unchecked = 0
    blind.python_render = lambda m, t: gptj_chat_spans(m, None, "<|endoftext|>")  # wrong only where tools are offered
    plain = [c for c in chats if not c["tools"]]
    blind(plain)
    assert blind.python_render is not None  # every kind it met agreed
    assert as_lists(blind(chats)) == [tuple(w) for w in want]
    assert blind.python_render is None  # the first conversation offering tools was a new kind: compared, and wrong
    own = ChatEncoder.of(gpt2_tokenizer, GPTJ_CHAT.replace("### User:", "### Human:"), False)
    assert own.python_render is None  # any other template: Jinja's rendering
