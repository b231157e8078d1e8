"""Seeded generators of broken recipes and broken data files for tests/test_fuzz.py. Each output is
broken for certain (a wrong type, an unknown key, a bound crossed, a contradiction, broken YAML or
JSON, bytes that are not UTF-8...), so the one right answer is exit 2 with one message."""

from __future__ import annotations

import gzip
import json
import random

import yaml
import zstandard

BASE = {
    "model": {"name_or_path": "tiny-gptj", "tiny": {"layers": 1, "width": 32, "heads": 2, "rotary_dim": 8, "context": 128}},
    "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"sources": [{"format": "synthetic", "count": 50}], "template": "plain", "max_length": 64,
             "eval_fraction": 0.1, "on_bad_record": "fail"},
    "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "keep_last": 1, "seed": 3, "schedule": "cosine",
              "optimizer": "adamw", "loss": "fused", "warmup_steps": 0},
    "distributed": {"backend": "single"},
    "eval": {"generate_samples": 0},
}  # fmt: skip

# A value of each kind that no field of that kind takes (pydantic's lax mode would turn "12" into 12).
WRONG = {
    int: ["lots", [1, 2], {"n": 1}, 1.5, "1e3x", "", "ten"],
    float: ["fast", [0.1], {"v": 1}, "1e-3x", ""],
    str: [[1, 2], {"a": "b"}, ["x"]],
    bool: ["maybe", [True], {"on": 1}, 2, "yess"],
    list: ["not a list", {"a": 1}, 5],
}
CHOICES = [("method", "kind"), ("model", "dtype"), ("train", "schedule"), ("train", "optimizer"), ("train", "loss"),
           ("distributed", "backend"), ("data", "on_bad_record"), ("model", "attn_implementation"),
           ("data", "sources", 0, "format")]  # fmt: skip
OUT_OF_BOUNDS = [
    (("train", "lr"), [0, -1e-3, 10, float("inf"), float("nan")]), (("train", "batch_size"), [0, -3, 10**12]),
    (("data", "max_length"), [0, -1, 10**9]), (("train", "keep_last"), [0, -2]), (("train", "max_steps"), [0, -5]),
    (("model", "tiny", "width"), [10**11, 0, 1e11]), (("model", "tiny", "layers"), [0, 10**7]), (("method", "r"), [0, -4]),
    (("data", "eval_fraction"), [1, 2.5, -0.1]), (("train", "grad_accum"), [0, -1]), (("model", "tiny", "heads"), [0, 3]),
    (("method", "dropout"), [1.5, -0.2]), (("data", "sources", 0, "count"), [1, -10, 10**12]),
]  # fmt: skip
CONTRADICTIONS = [
    {"method": {"kind": "qlora"}, "distributed": {"backend": "fsdp", "num_processes": 2}},
    {"train": {"optimizer": "adamw_8bit"}, "distributed": {"backend": "deepspeed", "num_processes": 2}},
    {"data": {"max_length": 4096}},
    {"distributed": {"backend": "ddp", "num_processes": 1}},
    {"data": {"sources": [{"format": "alpaca"}]}},
    {"data": {"sources": [{"format": "synthetic", "count": 50, "path": "x.json"}]}},
    {"data": {"sources": []}},
    {"model": {"name_or_path": "tiny-gptj", "tiny": {"width": 30, "heads": 4}}},
    {"method": {"kind": "prompt_tuning", "num_virtual_tokens": 0}},
]
BROKEN_YAML = [
    "model:\n\tname_or_path: tiny-gptj\n", "model: {name_or_path: tiny-gptj\n", "train:\n  lr: '1e-3\n",
    "train:\n  lr: *nowhere\n", "x: &a [*a]\n", "model:\n  dtype: float32\nmodel:\n  dtype: bf16\n", "- model\n- train\n",
    "just a sentence\n", "", "# only a comment\n", "42\n", "train: [lr, 1]\n", "model: name: x\n", "? [a, b]\n: c\n",
    "[" * 5000 + "]" * 5000 + "\n", "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n", "train:\n  lr: 1e-3\n lr: 2\n",
    "%YAML 9.9\n---\na: 1\n", "!!python/object:os.system ls\n", "train: !!binary aGVsbG8=\n",
]  # fmt: skip
BROKEN_BYTES = [b"\xff\xfe\x00model: x\n", b"model:\n  name_or_path: \xc3\x28\n", b"\x00\x01\x02\x03" * 50, b"train: {lr: 1}\x00\n"]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path, node


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[path[-1]] = value


def _merge(tree, patch):
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            _merge(tree[k], v)
        else:
            tree[k] = v


def _dump(tree) -> str:
    return yaml.safe_dump(tree, sort_keys=False)


def broken_recipes(seed: int, count: int, out_dir: str) -> list[tuple[str, bytes]]:
    """`count` (kind, file contents) pairs, every kind in turn; `out_dir` goes in output.dir."""
    rng = random.Random(seed)
    made = []
    kinds = ["type", "unknown", "choice", "bound", "contradiction", "missing_path", "yaml", "bytes", "section", "set_list"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        tree = json.loads(json.dumps(BASE))
        tree["output"] = {"dir": f"{out_dir}/run-{i}"}
        if kind == "type":
            path, value = rng.choice([(p, v) for p, v in _leaves(tree) if p[0] != "output"])
            kind_of = bool if isinstance(value, bool) else type(value)
            _set(tree, path, rng.choice(WRONG[kind_of]))
        elif kind == "unknown":
            path = rng.choice([p for p, _ in _leaves(tree) if p[0] != "output"])
            word = str(path[-1])
            typo = rng.choice([word + "s", word[:-1], word[::-1], word.replace("_", ""), "x" + word])
            _set(tree, path[:-1] + (typo if typo != word else word + "_x",), 1)
        elif kind == "choice":
            _set(tree, rng.choice(CHOICES), rng.choice(["nonsense", "LoRA", "bf17", "adam", "", "auto-ish"]))
        elif kind == "bound":
            path, values = rng.choice(OUT_OF_BOUNDS)
            _set(tree, path, rng.choice(values))
        elif kind == "contradiction":
            _merge(tree, json.loads(json.dumps(rng.choice(CONTRADICTIONS))))
        elif kind == "missing_path":
            name = "".join(rng.choice("abcdefgh") for _ in range(rng.choice([8, 300])))
            tree["data"]["sources"] = [{"format": rng.choice(["alpaca", "jsonl", "text", "chat"]), "path": f"./{name}.jsonl"}]
            if tree["data"]["sources"][0]["format"] == "jsonl":
                tree["data"]["sources"][0].update(prompt_field="p", response_field="r")
        elif kind == "yaml":
            made.append((kind, rng.choice(BROKEN_YAML).encode()))
            continue
        elif kind == "bytes":
            text = _dump(tree).encode()
            cut = rng.randrange(len(text))
            made.append((kind, rng.choice([text[:cut] + b"\xff" + text[cut:], *BROKEN_BYTES])))
            continue
        elif kind == "section":  # a whole section of the wrong shape
            tree[rng.choice(["model", "train", "data", "method", "eval", "distributed"])] = rng.choice([[1, 2], "text", 5, True])
        elif kind == "set_list":
            tree["data"]["sources"] = rng.choice([{"format": "alpaca"}, ["alpaca.json"], [None], [[1]]])
        made.append((kind, _dump(tree).encode()))
    return made


GOOD = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "again", "soon")]


# A chat template that refuses conversations whose roles do not alternate user/assistant, as Llama 2's does
STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")  # fmt: skip


def broken_data(seed: int, count: int) -> list[tuple[str, str, bytes, str]]:
    """`count` (kind, format, file contents, on_bad_record): files with a bad record among good ones,
    or with nothing usable. Under `skip`, every record is bad (no data is left)."""
    rng = random.Random(seed)
    made = []

    def lines(bad: bytes, skip: bool) -> bytes:
        good = [json.dumps(r).encode() for r in GOOD]
        rows = [] if skip else good[:]
        rows.insert(rng.randrange(len(rows) + 1), bad)
        return b"\n".join(rows) + b"\n"

    bad_records = {
        "not_utf8": lambda: b'{"instruction": "a", "input": "", "output": "\xff\xfe"}',
        "cut_json": lambda: json.dumps(GOOD[0]).encode()[: rng.randrange(1, 30)],
        "not_object": lambda: rng.choice([b"[1, 2]", b"42", b'"text"', b"null", b"true"]),
        "missing_field": lambda: json.dumps({"instruction": "a", "input": ""}).encode(),
        "wrong_type": lambda: json.dumps({"instruction": rng.choice([5, [1], {"a": 1}, None]), "input": "", "output": "b"}).encode(),
        "surrogate": lambda: b'{"instruction": "a\\ud800", "input": "", "output": "b"}',
        "deep": lambda: b"[" * 100_000 + b"]" * 100_000,
        "nul": lambda: b'{"instruction": "a", "input": "", "output": "b"}\x00',
        "binary": lambda: bytes(rng.randrange(256) for _ in range(64)).replace(b"\n", b" "),
        "big_number": lambda: b'{"instruction": "a", "input": "", "output": 1' + b"0" * 5000 + b"}",
    }  # fmt: skip
    chat_bad = {
        "chat_not_list": lambda: json.dumps({"messages": "hello"}).encode(),
        "chat_role": lambda: json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
        "chat_content": lambda: json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}).encode(),
        "chat_no_reply": lambda: json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
        "chat_tool_call": lambda: json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            rng.choice([{"function": {"name": "f", "arguments": rng.choice(["{\"a\": ", "[1]", "null x", "{'a': 1}"])}},
                        {"function": {"arguments": "{}"}}, {"type": "file_search", "function": {"name": "f"}}, "f(1)"])]},
            {"role": "assistant", "content": "y"}]}).encode(),
        # read as a conversation, but the recipe's template (STRICT_TEMPLATE) refuses a reply first
        "chat_template_refuses": lambda: json.dumps({"messages": [{"role": "assistant", "content": "first"},
                                                                  {"role": "user", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]}).encode(),
    }  # fmt: skip
    kinds = [*bad_records, *chat_bad, "empty", "json_not_list", "json_cut", "text_not_utf8", "gz_cut", "zst_cut", "csv_cells",
             "csv_not_utf8", "parquet_garbage"]  # fmt: skip
    good_lines = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        skip = rng.random() < 0.3
        policy = "skip" if skip else "fail"
        if kind in bad_records:
            made.append((kind, "alpaca", lines(bad_records[kind](), skip), policy))
        elif kind in chat_bad:
            good = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).encode()]
            rows = [] if skip else good * 3
            rows.insert(rng.randrange(len(rows) + 1), chat_bad[kind]())
            made.append((kind, "chat-strict" if kind == "chat_template_refuses" else "chat", b"\n".join(rows) + b"\n", policy))
        elif kind == "empty":
            made.append((kind, rng.choice(["alpaca", "chat"]), rng.choice([b"", b"\n\n", b"   \n"]), policy))
        elif kind == "json_not_list":
            made.append((kind, "alpaca-json", json.dumps(rng.choice([{"a": 1}, 5, "x"])).encode(), "fail"))
        elif kind == "json_cut":
            text = json.dumps(GOOD).encode()
            made.append((kind, "alpaca-json", text[: rng.randrange(1, len(text) - 1)], "fail"))
        elif kind == "text_not_utf8":
            made.append((kind, "text", b"Once upon a time\n" + bytes([0xC3, 0x28, 0xFF]) + b" there was\n", "fail"))
        elif kind in ("gz_cut", "zst_cut"):  # a download cut short
            whole = gzip.compress(good_lines) if kind == "gz_cut" else zstandard.ZstdCompressor().compress(good_lines)
            made.append((kind, f"alpaca-{kind[:-4]}", whole[: rng.randrange(1, len(whole) - 4)], policy))
        elif kind == "csv_cells":  # with skip every row is bad: no data is left
            rows = [] if skip else [f'"{r["instruction"]}","{r["input"]}","{r["output"]}"' for r in GOOD]
            rows.insert(rng.randrange(len(rows) + 1), rng.choice(["a,b", "a,b,c,d", '"unclosed,b,c']))
            made.append((kind, "alpaca-csv", ("instruction,input,output\n" + "\n".join(rows) + "\n").encode(), policy))
        elif kind == "csv_not_utf8":
            made.append((kind, "alpaca-csv", "instruction,input,output\nCaf\u00e9,,ok\n".encode("cp1252"), policy))
        elif kind == "parquet_garbage":
            made.append((kind, "alpaca-parquet", rng.choice([good_lines, b"PAR1" + bytes(rng.randrange(256) for _ in range(200))]), policy))
    return made
