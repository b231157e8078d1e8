"""Texts to token ids for the token store, as fast as the machine allows and exactly as the recipe's
tokenizer would encode them (`tokenizer(texts, add_special_tokens=False)`).

GPT-J's and GPT-Neo's tokenizer is GPT-2's byte-level BPE. tiktoken runs the same BPE ~8x faster
per core than the tokenizers library (measured on the shared novels: 4.96M against 0.63M tokens/s
on 2 cores) and spreads a batch over threads, so for a tokenizer of that kind we encode with a
tiktoken `Encoding` built from the tokenizer's own vocabulary. It is used only when it provably
gives the same ids: the tokenizer is byte-level BPE with GPT-2's split pattern and no normalizer,
its merges are in rank order (merge i makes token 256 + i, which is what tiktoken's ranks assume),
and the first batch of every build is encoded both ways and compared. A text holding one of the
tokenizer's added tokens (`<|endoftext|>` written out) goes to the tokenizer itself, which reads it
as that one token.
"""

from __future__ import annotations

import json
import os
from typing import Callable

Encode = Callable[[list[str]], list[list[int]]]

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHECK_CHARS = 200_000  # of the first batch, encoded both ways


def encoder(tokenizer) -> tuple[Encode, str]:
    """The encode function for `tokenizer`, and its name ("tiktoken" or "tokenizers")."""
    reference = _reference(tokenizer)
    fast = _tiktoken_encoding(tokenizer)
    if fast is None:
        return reference, "tokenizers"
    added = [t for t in tokenizer.get_added_vocab()]
    threads = os.cpu_count() or 1
    checked = False

    def encode(texts: list[str]) -> list[list[int]]:
        nonlocal checked, fast
        if fast is None:
            return reference(texts)
        plain = [i for i, t in enumerate(texts) if not any(a in t for a in added)]
        plain_set = set(plain)
        special = [i for i in range(len(texts)) if i not in plain_set]
        ids = _encode_in_threads(fast, [texts[i] for i in plain], threads)
        if not checked and plain:
            checked = True
            n, chars = 0, 0
            while n < len(plain) and chars < CHECK_CHARS:
                chars += len(texts[plain[n]])
                n += 1
            if reference([texts[i] for i in plain[:n]]) != ids[:n]:
                fast = None  # not the same BPE after all: the tokenizer encodes everything
                return reference(texts)
        out: list[list[int]] = [[] for _ in texts]
        for i, row in zip(plain, ids):
            out[i] = row
        for i, row in zip(special, reference([texts[i] for i in special])):
            out[i] = row
        return out

    return encode, "tiktoken"


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


def _reference(tokenizer) -> Encode:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] if texts else []
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _tiktoken_encoding(tokenizer):
    """A tiktoken Encoding with the tokenizer's ranks, or None where it would not give its ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
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
        ranks = {bytes(byte_of[ch] for ch in token): rank for token, rank in vocab.items()}
        import tiktoken

        return tiktoken.Encoding("gptj-tune-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError, ImportError):
        return None


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
