"""Conversations: messages checked and normalised, chat templates (Jinja, as transformers' are),
and a conversation turned into token ids with the loss on the assistant turns only.

The ids are exactly what `tokenizer.apply_chat_template(messages)` gives in plain transformers:
the conversation is rendered with the template (transformers' own renderer), the whole text is
tokenized once, and a token is a target when it starts inside an assistant turn's span. A span is
found by rendering: the conversation up to the turn with the generation prompt, then with the turn;
the difference is the reply and its end marker.

The built-in template `gptj-chat` uses text GPT-J's tokenizer already has (`### User:`,
`### Assistant:`) and ends each reply with EOS (`<|endoftext|>`, id 50256), the token GPT-J was
trained to end documents with: no new special tokens, so no embedding rows to train or export.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError, typed_first_line
from .chat_tools import TOOL_CALL, calls_in_text, result_fields, result_text, tool_calls_of
from .unicode import half_surrogate

GPTJ_CHAT = (  # (a turn without tool calls costs what it did before tools: `'tool_calls' in message` is cheap, a missing key is not)
    "{%- macro tool_list() -%}{{ '### Tools:' }}"
    "{%- for tool in tools -%}{{ '\\n' + ((tool['function'] if tool['function'] is defined else tool) | tojson) }}{%- endfor -%}"
    "{%- endmacro -%}"
    "{%- if tools and (not messages or messages[0]['role'] != 'system') -%}"
    "{{ tool_list() }}{%- if messages -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- if loop.first and tools -%}{{ '\\n\\n' + tool_list() }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'tool' -%}{{ '### Tool result:\\n' + message['content'] }}"
    "{%- elif 'tool_calls' in message and message['tool_calls'] -%}{{ '### Assistant:\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>' }}"
    "{{ {'name': function['name'], 'arguments': function['arguments']} | tojson }}{{ '</tool_call>' }}"
    "{%- endfor -%}"
    "{{ eos_token }}"
    "{%- else -%}{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Assistant:\\n' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"gptj-chat": GPTJ_CHAT}

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
         "ipython": "tool", "function_call": TOOL_CALL}  # fmt: skip


@dataclass(frozen=True)
class ChatFields:
    """Where a chat source keeps its turns: the record's field, each turn's role and text keys
    (None: the OpenAI or ShareGPT defaults), and its role names on top of ROLES."""

    messages: str | None = None
    role: str | None = None
    content: str | None = None
    roles: tuple[tuple[str, str], ...] = ()  # (name in the data, lower case; system, user, assistant or tool)
    key: str = "this source"  # the recipe key of the source, for the messages

    @classmethod
    def of(cls, source, key: str) -> "ChatFields":
        names = tuple((name.lower(), role) for role, names in (source.roles or {}).items() for name in names)
        return cls(source.messages_field, source.role_field, source.content_field, names, key)

    def role_names(self) -> dict[str, str]:
        return {**ROLES, **dict(self.roles)}


def template_text(spec: str) -> str:
    """A built-in template's Jinja text, or the recipe's own Jinja as it is."""
    return CHAT_TEMPLATES.get(spec, spec)


def messages_of(raw: dict, origin: str, fields: ChatFields = ChatFields()) -> list[dict]:
    """`messages: [{role, content}]` (OpenAI) or ShareGPT `conversations: [{from, value}]` (with a
    top-level `system` prompt, where given), or the field and keys `fields` names, checked, as
    [{role, content}] with roles system, user, assistant and tool (and `weight` on replies that have
    one, `tool_calls` on an assistant's calls: data/chat_tools.py)."""
    field = fields.messages or ("messages" if "messages" in raw or "conversations" not in raw else "conversations")
    if field not in raw:
        wanted = (f"`{field}` (its turns: set {fields.key}.messages_field to the field that holds them)" if fields.messages
                  else "`messages` (role/content) or `conversations` (from/value), or set "
                       f"{fields.key}.messages_field to the field holding the turns")  # fmt: skip
        raise DataError(f"{origin}: a chat record needs {wanted}; fields present: {', '.join(raw) or 'none'}")
    sharegpt = field == "conversations"
    turns = raw[field]
    role_key = fields.role or ("from" if sharegpt else "role")
    text_key = fields.content or ("value" if sharegpt else "content")
    role_names = fields.role_names()
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{origin}: `{field}` must be a non-empty list of turns")
    out = []
    for n, turn in enumerate(turns):
        where = f"{origin}: `{field}[{n}]`"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with `{role_key}` and `{text_key}`, got {type(turn).__name__}")
        out.append(_message(turn, where, role_key, text_key, role_names, fields.key))
    if raw.get("system") is not None:  # a ShareGPT export's system prompt beside its turns
        if any(m["role"] == "system" for m in out):
            raise DataError(f"{origin}: both a `system` field and a system turn; keep one")
        out.insert(0, {"role": "system", "content": _text_of(raw["system"], f"{origin}: `system`")})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{origin}: the conversation has no assistant turn, so nothing to learn from")
    if not any(learned(m) for m in out):
        raise DataError(f"{origin}: every assistant turn has `weight` 0, so nothing to learn from")
    return out


def _message(turn: dict, where: str, role_key: str, text_key: str, role_names: dict, key: str) -> dict:
    """One turn as {role, content} (with `tool_calls` on an assistant's calls, the call's id and the
    tool's name on a result, `weight` on a reply that has one)."""
    if role_key not in turn:
        raise DataError(f"{where} has no `{role_key}` (keys present: {', '.join(map(str, turn)) or 'none'}; "
                        f"{key}.role_field names the key)")  # fmt: skip
    role = turn[role_key]
    if not isinstance(role, str) or role.lower() not in role_names:
        raise DataError(f"{where}: unknown role {role!r}; expected system, user, assistant or tool (ShareGPT: system, human, "
                        f"gpt, function_call, observation), or a name in {key}.roles, e.g. roles: {{user: [{role}]}}")  # fmt: skip
    role = role_names[role.lower()]
    calls = role == "assistant" and (turn.get("tool_calls") is not None or turn.get("function_call") is not None)
    if text_key not in turn and not calls:
        raise DataError(f"{where} has no `{text_key}` (keys present: {', '.join(map(str, turn)) or 'none'}; "
                        f"{key}.content_field names the key)")  # fmt: skip
    if role == TOOL_CALL:  # ShareGPT's function_call: the calls are the turn's text, as JSON
        message = {"role": "assistant", "content": "", "tool_calls": calls_in_text(turn[text_key], f"{where}: `{text_key}`")}
    elif calls:  # OpenAI's: the text before the calls (often null) and the calls
        text = turn.get(text_key)
        message = {"role": role, "content": "" if text is None else _text_of(text, f"{where}: `{text_key}`"),
                   "tool_calls": tool_calls_of(turn, where)}  # fmt: skip
    elif role == "tool":  # a result: text, or a JSON object some datasets keep it as
        message = {"role": role, "content": _text_of(result_text(turn[text_key]), f"{where}: `{text_key}`"), **result_fields(turn)}
    else:
        message = {"role": role, "content": _text_of(turn[text_key], f"{where}: `{text_key}`")}
    if "weight" in turn and message["role"] == "assistant":  # OpenAI's fine-tuning format: 0 = not learned
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise DataError(f"{where}: `weight` must be 0 (not learned from) or 1, got {turn['weight']!r}")
        message["weight"] = int(turn["weight"])
    return message


def last_reply_only(messages: list[dict]) -> list[dict]:
    """The conversation with every learned reply but the last at `weight` 0: still seen, not learned."""
    last = max(i for i, m in enumerate(messages) if learned(m))
    return [{**m, "weight": 0} if learned(m) and i != last else m for i, m in enumerate(messages)]


def learned(message: dict) -> bool:
    """Whether a turn is learned from: an assistant reply whose `weight` is not 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def _text_of(content, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of content parts whose text parts are joined (as
    chat templates render them, with nothing between)."""
    if isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                continue
            what = (f"a {kind!r} part" if kind not in (None, "text") else "not a text part ({type: text, text: \"...\"})")
            raise DataError(f"{where}[{n}] is {what}: gptj-tune trains on text only (set data.on_bad_record: skip to "
                            f"skip such records)")  # fmt: skip
        content = "".join(texts)
    if not isinstance(content, str):
        raise DataError(f"{where} must be a string (or a list of text parts), got {type(content).__name__}")
    if (wrong := half_surrogate(content)) is not None:
        raise DataError(f"{where} {wrong}")
    return content


class ChatTemplateError(DataError):
    """The template's own code failed on a conversation (its `raise_exception`, e.g. roles that do
    not alternate, or any error inside it): that conversation cannot be rendered."""

    def __init__(self, reason: str):
        self.reason = reason  # the template's own error, typed: `TemplateError: ...`
        super().__init__(f"the chat template could not render this conversation: {reason}")


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:  # fmt: skip
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)  # fmt: skip
    except Exception as e:  # Jinja's errors, and whatever a template's expressions raise
        raise ChatTemplateError(typed_first_line(e)) from None


def assistant_spans(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns learned from."""
    text = render(tokenizer, template, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if not learned(m):
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools) if i else \
            _before_first_reply(tokenizer, template, messages[0], tools, text)
        upto = text if i == len(messages) - 1 else render(tokenizer, template, messages[: i + 1], tools=tools)
        if not upto.startswith(before) or not text.startswith(upto):
            raise DataError("data.chat_template: rendering a conversation turn by turn does not give its beginning "
                            "(the template changes earlier turns when later ones follow); assistant turns cannot be "
                            "found, so the loss cannot be limited to them")  # fmt: skip
        spans.append((len(before), len(upto)))
    return text, spans


REPLY_MARK = "gptjTuneReplyStartsHere"


def _before_first_reply(tokenizer, template: str, reply: dict, tools: list[dict] | None, text: str) -> str:
    """What the template writes before a reply that opens the conversation (the tools, a default
    system prompt, the reply's header): transformers cannot render the empty conversation before
    it, so the reply is rendered alone with a mark for its text, and what comes before the mark is
    taken when the whole conversation begins with it. Otherwise "": the reply from the text's start."""
    try:
        alone = render(tokenizer, template, [{**reply, "content": REPLY_MARK}], tools=tools)
    except ChatTemplateError:
        return ""
    at = alone.find(REPLY_MARK)
    return alone[:at] if at > 0 and text.startswith(alone[:at]) else ""


def chat_ids(tokenizer, template: str, messages: list[dict], train_on_prompt: bool,
             tools: list[dict] | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """Token ids of the rendered conversation, and 1 where a token is a target (in an assistant
    turn, or any token but the first with train_on_prompt)."""
    return ids_and_targets(tokenizer, *assistant_spans(tokenizer, template, messages, tools), train_on_prompt)


def ids_and_targets(tokenizer, text: str, spans: list[tuple[int, int]], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """A rendered conversation's ids and targets, from the tokenizer's offset mapping."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on_prompt:
        return ids, [0] + [1] * (len(ids) - 1)
    targets = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
    if targets:
        targets[0] = 0
    return ids, targets


def held_out_record(tokenizer, template: str, record: dict) -> dict:
    """A held-out conversation as an instruction record: everything before the last assistant turn
    rendered with the generation prompt is the prompt, that turn the reference answer (the last
    one learned from: a `weight` 0 reply is no reference). A reply that calls tools is referred to
    as the template writes it (its calls included), up to EOS, as generation stops there. A reply
    that opens the conversation is prompted by what the template writes before it (its header)."""
    messages, tools = record["messages"], record.get("tools")
    last = max(i for i, m in enumerate(messages) if learned(m))
    if last:
        prompt = render(tokenizer, template, messages[:last], add_generation_prompt=True, tools=tools)
    else:  # the reply opens the conversation: no conversation before it to render
        prompt = _before_first_reply(tokenizer, template, messages[0], tools, render(tokenizer, template, messages[:1], tools=tools))
    reference = messages[last]["content"]
    if messages[last].get("tool_calls"):
        reply = render(tokenizer, template, messages[: last + 1], tools=tools)[len(prompt) :]
        reference = reply.split(tokenizer.eos_token)[0].strip() if tokenizer.eos_token else reply.strip()
    return {"instruction": prompt, "input": "", "output": reference, "prompt_text": prompt, "origin": record["origin"],
            "messages": messages, **({"tools": tools} if tools else {})}  # fmt: skip
