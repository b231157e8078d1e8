"""Function calling in conversations: the tools a conversation offers, the assistant's calls and
the tools' results, read from OpenAI's and ShareGPT's (LLaMA-Factory's) layouts into the one
layout transformers' chat templates take:

- the tools: `[{"type": "function", "function": {"name", "description", "parameters"}}]`, given
  to the template as `tools`;
- a call: an assistant turn with `tool_calls: [{"type": "function", "function": {"name",
  "arguments"}}]` (arguments a JSON object, not its text; `id` kept where given), its `content`
  the text before the calls or "";
- a result: a turn with role `tool` (`tool_call_id` and `name` kept where given).
"""

from __future__ import annotations

import json

from ..errors import DataError

TOOL_CALL = "tool_call"  # the role of ShareGPT's `function_call` turn: the assistant's calls written as JSON


def tools_of(raw: dict, origin: str) -> list[dict] | None:
    """The record's `tools` (a list, or its JSON text as LLaMA-Factory keeps it) as function
    schemas, or None when it offers none."""
    tools = raw.get("tools")
    if isinstance(tools, str):
        tools = _json(tools, f"{origin}: `tools`") if tools.strip() else None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{origin}: `tools` must be a list of function schemas ({{name, description, parameters}}), "
                        f"got {type(tools).__name__}")  # fmt: skip
    return [_tool(tool, f"{origin}: `tools[{n}]`") for n, tool in enumerate(tools)]


def _tool(tool, where: str) -> dict:
    schema = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
    if isinstance(tool, dict) and tool.get("type", "function") != "function":
        raise DataError(f"{where} is a {tool['type']!r} tool; only function tools can be trained on")
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not schema["name"]:
        raise DataError(f"{where} must be a function schema with a `name` (a string), e.g. {{name: get_weather, "
                        f"description: ..., parameters: {{type: object, properties: {{...}}}}}}")  # fmt: skip
    return {"type": "function", "function": schema}


def tool_calls_of(turn: dict, where: str) -> list[dict]:
    """An OpenAI assistant turn's `tool_calls` (or the older `function_call`, one call)."""
    if turn.get("tool_calls") is not None:
        calls, key = turn["tool_calls"], "tool_calls"
        if not isinstance(calls, list) or not calls:
            raise DataError(f"{where}: `tool_calls` must be a non-empty list of calls ({{type: function, function: "
                            f"{{name, arguments}}}}), got {calls!r:.60}")  # fmt: skip
    else:
        calls, key = [turn["function_call"]], "function_call"
    return [_call(call, f"{where}: `{key}" + (f"[{n}]`" if key == "tool_calls" else "`")) for n, call in enumerate(calls)]


def calls_in_text(text, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: one call `{"name", "arguments"}` as JSON text, or a
    list of them."""
    value = _json(text, where) if isinstance(text, str) else text
    calls = value if isinstance(value, list) and value else [value]
    return [_call(call, where + (f"[{n}]" if len(calls) > 1 else "")) for n, call in enumerate(calls)]


def _call(call, where: str) -> dict:
    """One call as transformers' templates take it: its arguments parsed from JSON text."""
    body = call.get("function") if isinstance(call, dict) and "function" in call else call
    if isinstance(call, dict) and "function" in call and call.get("type", "function") != "function":
        raise DataError(f"{where} is a {call['type']!r} call; only function calls can be trained on")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        raise DataError(f"{where} must be a call with a `name` (a string) and `arguments` (a JSON object), "
                        f"got {json.dumps(call, ensure_ascii=False)[:80]}")  # fmt: skip
    arguments = body.get("arguments")
    if arguments is None:  # a call without arguments
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _json(arguments, f"{where}: `arguments`") if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: `arguments` must be a JSON object (name to value), got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": body["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def result_text(content):
    """A tool's result as the template gets it: text as it is, a JSON object as its JSON text."""
    return json.dumps(content, ensure_ascii=False) if isinstance(content, dict) else content


def result_fields(turn: dict) -> dict:
    """What a tool result keeps beside its text: the call it answers, the tool's name."""
    return {key: turn[key] for key in ("tool_call_id", "name") if isinstance(turn.get(key), str)}


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON: {e.msg} at character {e.pos} of {text[:60]!r}") from None
