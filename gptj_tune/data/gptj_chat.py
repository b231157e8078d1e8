"""The built-in `gptj-chat` template (data/chat.py's GPTJ_CHAT) written out in Python, for builds:
one pass gives the text and the assistant spans that assistant_spans finds with 2k + 1 Jinja
renders (0.15 ms each) for a conversation of k learned replies.

It is a second copy of the template's rules, so it is never trusted alone: ChatEncoder compares
it with the Jinja renderer on each build's first CHECK_CHARS characters and goes the Jinja way for
the whole build at the first difference (as it does for tiktoken's ids), and the tests compare the
two on random conversations of every kind of turn.
"""

from __future__ import annotations

import json

from .chat import learned

HEADER = "### Assistant:\n"


def gptj_chat_spans(messages: list[dict], tools: list[dict] | None, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """What assistant_spans gives with GPTJ_CHAT: the rendered conversation and the spans of the
    replies learned from, each from the end of its header to the end of its EOS."""
    tool_list = "### Tools:" + "".join("\n" + _json(t["function"] if "function" in t else t) for t in tools) if tools else ""
    parts = [tool_list + ("\n\n" if messages else "")] if tools and (not messages or messages[0]["role"] != "system") else []
    at = len(parts[0]) if parts else 0  # where the next turn's separator (or the first turn) begins
    spans = []
    for n, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            turn = content + ("\n\n" + tool_list if n == 0 and tools else "")
        elif role == "user":
            turn = "### User:\n" + content
        elif role == "tool":
            turn = "### Tool result:\n" + content
        elif m.get("tool_calls"):
            turn = HEADER + (content or "") + _calls(m["tool_calls"], content) + eos
        else:
            turn = HEADER + content + eos
        if n:
            parts.append("\n\n")
            at += 2
        if learned(m):
            spans.append((at + len(HEADER), at + len(turn)))
        parts.append(turn)
        at += len(turn)
    return "".join(parts), spans


def _calls(calls: list[dict], content: str | None) -> str:
    out = []
    for n, call in enumerate(calls):
        function = call["function"] if "function" in call else call
        out.append(("\n" if content or n else "") + "<tool_call>" + _json({"name": function["name"], "arguments": function["arguments"]})
                   + "</tool_call>")  # fmt: skip
    return "".join(out)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # transformers' `tojson` filter, as the template calls it
