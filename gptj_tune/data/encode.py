"""Texts to token ids for the token store, as fast as the machine allows and exactly as the recipe's
tokenizer would encode them (`tokenizer(texts, add_special_tokens=False)`).

GPT-J's and GPT-Neo's tokenizer is GPT-2's byte-level BPE. tiktoken runs the same BPE ~8x faster
per core than the tokenizers library (measured on the shared novels: 4.96M against 0.63M tokens/s
on 2 cores) and spreads a batch over threads, so for a tokenizer of that kind we encode with a
tiktoken `Encoding` built from the tokenizer's own vocabulary. It is used only when it provably
gives the same ids: the tokenizer is byte-level BPE with GPT-2's split pattern and no normalizer,
its merges are in rank order (merge i makes token 256 + i, which is what tiktoken's ranks assume),
and the first batch of every build is encoded both ways and compared. A text holding one of the
tokenizer's added tokens (`<|endoftext|>` written out, as a chat template ends each reply) is cut
around them as the tokenizer cuts it, the pieces encoded with tiktoken and each added token put in
as its one id; the first such batch is compared with the tokenizer too. Added tokens that strip
whitespace or match single words only send their texts to the tokenizer itself.
"""

from __future__ import annotations

import json
import os
from typing import Callable

Encode = Callable[[list[str]], list[list[int]]]

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHECK_CHARS = 200_000  # of the first batch, encoded both ways


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, a batch scheduler's cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encoder(tokenizer, threads: int | None = None) -> tuple[Encode, str]:
    """The encode function for `tokenizer`, and its name ("tiktoken" or "tokenizers"); tiktoken's
    runs in `threads` threads (default: one a core this process may use)."""
    reference = _reference(tokenizer)
    fast = _tiktoken_encoding(tokenizer)
    if fast is None:
        return reference, "tokenizers"
    added = tokenizer.get_added_vocab()
    cut = _added_token_cutter(tokenizer)
    threads = threads or available_cores()
    checked = {"plain": False, "added": False}

    def agrees(kind: str, texts: list[str], ids: list[list[int]]) -> bool:
        """The first batch of a kind: its first CHECK_CHARS characters' texts encoded by the tokenizer too."""
        if checked[kind] or not texts:
            return True
        checked[kind] = True
        n = checked_count(texts)
        return reference(texts[:n]) == ids[:n]

    def encode(texts: list[str]) -> list[list[int]]:
        nonlocal fast, cut
        if fast is None:
            return reference(texts)
        plain = [i for i, t in enumerate(texts) if not any(a in t for a in added)]
        plain_set = set(plain)
        special = [i for i in range(len(texts)) if i not in plain_set]
        ids = _encode_in_threads(fast, [texts[i] for i in plain], threads)
        if not agrees("plain", [texts[i] for i in plain], ids):
            fast = None  # not the same BPE after all: the tokenizer encodes everything
            return reference(texts)
        special_texts = [texts[i] for i in special]
        special_ids = _encode_cut(fast, cut, added, special_texts, threads) if cut else reference(special_texts)
        if cut and not agrees("added", special_texts, special_ids):
            cut = None  # the tokenizer cuts around its added tokens otherwise: it encodes those texts
            special_ids = reference(special_texts)
        out: list[list[int]] = [[] for _ in texts]
        for i, row in zip(plain, ids):
            out[i] = row
        for i, row in zip(special, special_ids):
            out[i] = row
        return out

    return encode, "tiktoken"


def checked_count(texts: list[str], budget: int = CHECK_CHARS) -> int:
    """How many of `texts`, from the first, hold the first `budget` characters (CHECK_CHARS: the
    part of a build's first batch that is also encoded the slow, sure way and compared)."""
    n, chars = 0, 0
    while n < len(texts) and chars < budget:
        chars += len(texts[n])
        n += 1
    return n


def _added_token_cutter(tokenizer):
    """A regex that finds the tokenizer's added tokens in a text, longest first at each place (as the
    tokenizer matches them), or None where one of them strips whitespace or matches single words
    only, which a plain cut would not reproduce."""
    import re

    tokens = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
    if not tokens or any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) or getattr(t, "single_word", False)
                         for t in tokens):  # fmt: skip
        return None
    return re.compile("|".join(re.escape(t.content) for t in sorted(tokens, key=lambda t: -len(t.content))))


def _encode_cut(encoding, cut, added: dict[str, int], texts: list[str], threads: int) -> list[list[int]]:
    """Texts holding added tokens: the pieces between them encoded with tiktoken, each added token its id."""
    pieces, layout = [], []  # per text: ("piece", index into pieces) or ("id", added id), in order
    for text in texts:
        parts, at = [], 0
        for found in cut.finditer(text):
            if found.start() > at:
                parts.append(("piece", len(pieces)))
                pieces.append(text[at : found.start()])
            parts.append(("id", added[found.group()]))
            at = found.end()
        if at < len(text):
            parts.append(("piece", len(pieces)))
            pieces.append(text[at:])
        layout.append(parts)
    encoded = _encode_in_threads(encoding, pieces, threads)
    out = []
    for parts in layout:
        row: list[int] = []
        for kind, value in parts:
            if kind == "id":
                row.append(value)
            else:
                row += encoded[value]
        out.append(row)
    return out


def _encode_in_threads(encoding, texts: list[str], threads: int) -> list[list[int]]:
    """tiktoken releases the GIL while it encodes: one slice of the texts per thread (its own
    batch call submits a task per text, which costs more than a short text's encoding)."""
    if threads == 1 or len(texts) < 2:
        return [encoding.encode_ordinary(t) for t in texts]
    from concurrent.futures import ThreadPoolExecutor

    step = -(-len(texts) // threads)
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda a: [encoding.encode_ordinary(t) for t in texts[a : a + step]], range(0, len(texts), step))
        return [ids for part in parts for ids in part]


def token_byte_lengths(tokenizer):
    """How many bytes of text each token id stands for (added tokens: their text's), as a numpy
    array by id; None for a tokenizer tiktoken does not stand in for (not GPT-2's byte-level BPE).
    Summed along a row of ids, it gives each token's byte offset in the text without the
    tokenizer's offset mapping."""
    import numpy as np

    ranks = _tiktoken_ranks(tokenizer)
    if ranks is None:
        return None
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    lengths = np.zeros(max([*ranks.values(), *added.values()]) + 1, np.int64)
    for token, i in ranks.items():
        lengths[i] = len(token)
    for content, i in added.items():
        lengths[i] = len(content.encode("utf-8"))
    return lengths


def _reference(tokenizer) -> Encode:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] if texts else []
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _tiktoken_encoding(tokenizer):
    """A tiktoken Encoding with the tokenizer's ranks, or None where it would not give its ids."""
    ranks = _tiktoken_ranks(tokenizer)
    if ranks is None:
        return None
    try:
        import tiktoken

        return tiktoken.Encoding("gptj-tune-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    except (ValueError, ImportError):
        return None


def _tiktoken_ranks(tokenizer) -> dict[bytes, int] | None:
    """The tokenizer's BPE ranks as tiktoken takes them (a token's bytes -> its id), or None where
    tiktoken would not give the tokenizer's ids with them."""
    spec = _bpe_spec(tokenizer)
    if spec is None:
        return None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or spec.get("normalizer") or pre.get("type") != "ByteLevel"
            or not pre.get("use_regex", True)):  # fmt: skip
        return None
    vocab, merges = model["vocab"], model["merges"]
    byte_of = _byte_alphabet()
    for i, merge in enumerate(merges):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if vocab.get(a + b) != 256 + i:
            return None
    try:
        return {bytes(byte_of[ch] for ch in token): rank for token, rank in vocab.items()}
    except KeyError:
        return None


def _bpe_spec(tokenizer) -> dict | None:
    """The fast tokenizer's own JSON description, or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    return json.loads(backend.to_str()) if backend is not None else None


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
