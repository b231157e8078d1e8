"""A recipe's data written into a token store (data/store.py): sources read a chunk of records at a
time, tokenized in batches (the fast tokenizer encodes a batch on every core), appended to disk,
then split, weighted and packed as index arrays. Memory stays flat: what is kept per example is its
length and counts, and per instruction record an offset into a spill file of the records (so the
held-out records can be read back once the split is known).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import DataError
from ..recipe import DataSection
from .chat import held_out_record, last_reply_only, template_text
from .chat_encode import ChatEncoder, ChatPool, data_workers
from .encode import encoder, token_byte_lengths
from .formats import SkipLog, TextFile, iter_records
from .pack import pack_lengths
from .spill import read_lines, spill_line, spilled_chunks
from .store import StoreWriter
from .templates import Template, get_template

RECORDS_PER_CHUNK = 4096
CONVERSATIONS_PER_CHUNK = 512  # a conversation is longer: its chunk is smaller
SKIPPED = -2  # a record's example index when it was skipped after it was read (a conversation the template cannot render)
CHARS_PER_CHUNK = 4_000_000  # raw text tokenized per batch call
PIECE_CHARS = 65_536  # a long document is cut into pieces this long (at exact boundaries) to spread it over cores

Progress = Callable[[int, int], None]  # (records read so far, tokens written so far)


def split_indices(n: int, fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of n items: the same (n, fraction, cap, seed) gives the same split."""
    n_eval = min(cap, int(round(n * fraction))) if n > 1 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    keep = np.ones(n, bool)
    keep[held] = False
    return np.flatnonzero(keep).tolist(), held


def apply_weight(indices: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """A source's example indices repeated `floor(weight)` times plus a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(indices.tolist(), int(round(len(indices) * frac)))
    return np.concatenate([np.tile(indices, whole), np.asarray(extra, np.int64)]).astype(np.int64)


def build_store(section: DataSection, tokenizer, prompt_slots: int, folder: Path, progress: Progress | None = None) -> None:
    """Every source of `section` read, tokenized, split, weighted and packed into the store at `folder`."""
    template = get_template(section.template)
    writer = StoreWriter(folder, len(tokenizer))
    workers = data_workers(section.workers)
    (encode, encoder_name), exact_cuts = encoder(tokenizer, workers), cuts_are_exact(tokenizer)
    chat = template_text(section.chat_template)
    byte_lengths = token_byte_lengths(tokenizer) if encoder_name == "tiktoken" and any(s.is_chat for s in section.sources) else None
    chats = ChatPool(ChatEncoder(tokenizer, chat, section.train_on_prompt, encode, byte_lengths), workers)
    train_parts, eval_parts, eval_records, sources = [], [], [], []
    stats = {"train": _Stats(), "eval": _Stats()}
    skipped = SkipLog(keep=20)
    seen: set[bytes] | None = set() if section.deduplicate else None  # 16-byte digests of the records read
    counter = _Counter(progress)
    try:
        for index, source in enumerate(section.sources):
            first, skipped_before, records_before = writer.n_examples, skipped.count, counter.records
            records = counter.wrap(iter_records(source, index, section.on_bad_record, skipped))
            duplicates = [0]
            if seen is not None:
                records = _first_copies(records, seen, duplicates)
            if source.format == "text":
                _write_text(records, encode, exact_cuts, tokenizer.eos_token_id, section.max_length, prompt_slots, writer, counter)
                n = writer.n_examples - first
                train_idx, eval_idx = split_indices(n, section.eval_fraction, section.eval_max, section.split_seed)
                train = first + np.asarray(train_idx, np.int64)
                held = first + np.asarray(eval_idx, np.int64)
                dropped = {"train": 0, "eval": 0}
                n_records = counter.records - records_before
            else:
                spill = folder / f"records-{index}.jsonl"
                if source.is_chat:
                    example_of, offsets = _write_chats(records, chats, tokenizer.eos_token_id, section, prompt_slots, writer, spill,
                                                       counter, skipped)  # fmt: skip
                    kept = example_of != SKIPPED  # conversations the template could not render are gone, as bad records
                    example_of, offsets = example_of[kept], offsets[kept]
                    if not len(example_of):
                        raise DataError(f"data.sources[{index}]: no usable records in {source.path} ({skipped.count - skipped_before} "
                                        f"skipped; the last: {skipped.last})")  # fmt: skip
                else:
                    example_of, offsets = _write_instructions(records, encode, tokenizer.eos_token_id, template, section,
                                                              prompt_slots, writer, spill, counter)  # fmt: skip
                n_records = len(example_of)
                train_idx, eval_idx = split_indices(n_records, section.eval_fraction, section.eval_max, section.split_seed)
                train_of, held_of = example_of[train_idx], example_of[eval_idx]
                train, held = train_of[train_of >= 0], held_of[held_of >= 0]
                dropped = {"train": int((train_of < 0).sum()), "eval": int((held_of < 0).sum())}
                held_records = read_lines(spill, offsets, eval_idx)
                eval_records += [held_out_record(tokenizer, chat, r) for r in held_records] if source.is_chat else held_records
                spill.unlink()
            stats["train"].add(writer, train, dropped["train"])
            stats["eval"].add(writer, held, dropped["eval"])
            train_parts.append(apply_weight(train, source.weight, section.split_seed + index))
            eval_parts.append(held)
            sources.append({"format": source.format, "path": source.path, "records": n_records,
                            "skipped": skipped.count - skipped_before, "duplicates": duplicates[0], "examples": writer.n_examples - first,
                            "train_examples": len(train), "held_out_examples": len(held)})  # fmt: skip
        lengths = writer.lengths()
        rows = {split: _rows(np.concatenate(parts), lengths, section.max_length, section.packing)
                for split, parts in (("train", train_parts), ("eval", eval_parts))}  # fmt: skip
        writer.finish(rows, {
            "template": asdict(template), "eval_records": eval_records, "sources": sources,
            "train_stats": vars(stats["train"]), "eval_stats": vars(stats["eval"]),
            "skipped_records": skipped.count, "skipped_messages": skipped.messages,
            "max_length": section.max_length, "prompt_slots": prompt_slots, "encoder": encoder_name,
        })  # fmt: skip
    except BaseException:
        writer.abandon()
        raise
    finally:
        chats.close()


def _first_copies(records: Iterable[dict], seen: set[bytes], duplicates: list[int]) -> Iterator[dict]:
    """The records not seen before (by a digest of every field but `origin`; a .txt document's by its
    text, read a part at a time); each one left out counted in duplicates[0]."""
    for record in records:
        digest = hashlib.blake2b(digest_size=16)
        for key in sorted(k for k in record if k != "origin"):
            value = record[key]
            digest.update(json.dumps(key).encode())
            if isinstance(value, TextFile):
                for part in value.parts():
                    digest.update(part.encode("utf-8", "surrogatepass"))
            else:
                digest.update(spill_line(value).encode())
        key = digest.digest()
        if key in seen:
            duplicates[0] += 1
            continue
        seen.add(key)
        yield record


def _rows(examples: np.ndarray, lengths: np.ndarray, max_length: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    if not packing:
        return np.arange(len(examples) + 1, dtype=np.int64), examples
    row_starts, members = pack_lengths(lengths[examples], max_length)
    return row_starts, examples[members]


class _Stats:
    """TokenizeStats of one split, counted from the writer's per-example arrays."""

    def __init__(self):
        self.examples = self.truncated = self.dropped = self.tokens = self.target_tokens = 0

    def add(self, writer: StoreWriter, examples: np.ndarray, dropped: int) -> None:
        self.examples += len(examples)
        self.truncated += int(writer.truncated()[examples].sum())
        self.dropped += dropped
        self.tokens += int(writer.lengths()[examples].sum())
        self.target_tokens += int(writer.target_counts()[examples].sum())


class _Counter:
    def __init__(self, progress: Progress | None):
        self.progress, self.records, self.tokens = progress, 0, 0

    def wrap(self, records: Iterator[dict]) -> Iterator[dict]:
        for r in records:
            self.records += 1
            yield r

    def wrote(self, tokens: int) -> None:
        self.tokens += tokens
        if self.progress:
            self.progress(self.records, self.tokens)


def cuts_are_exact(tokenizer) -> bool:
    """Whether a text cut between a non-space character, a newline and a non-space character
    tokenizes to the same ids in pieces as whole: true of GPT-2's byte-level BPE (GPT-J, GPT-Neo),
    whose pre-tokenizer always ends a word before a newline and starts one after it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer")


_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _pieces(parts: Iterable[str], exact_cuts: bool) -> Iterator[str]:
    """A document, given whole or a part at a time (a TextFile's parts), cut into pieces of about
    PIECE_CHARS at newlines between non-space characters, one at a time: the text after the last
    cut waits for the next part, so at most a part and a piece are held, and a document of
    gigabytes is never copied whole into pieces."""
    if not exact_cuts:
        yield "".join(parts)  # no exact cut known: the document is tokenized whole
        return
    pending = ""
    for part in parts:
        pending = pending + part if pending else part
        start = 0
        while len(pending) - start > 2 * PIECE_CHARS:
            m = _CUT.search(pending, start + PIECE_CHARS)
            if m is None:
                break
            yield pending[start : m.start()]
            start = m.start()
        pending = pending[start:]
    if pending:
        yield pending


def _write_text(records, encode, exact: bool, eos: int, max_length: int, slots: int, writer: StoreWriter,
                counter: _Counter) -> None:  # fmt: skip
    """Documents joined with EOS and cut into blocks of max_length - slots tokens; every token is a
    target except the first of a block (nothing predicts it) and the soft prompt's slots."""
    block = max_length - slots
    carry = np.zeros(0, np.int64)
    texts: list[str] = []
    ends: list[bool] = []  # whether each piece ends a document (EOS follows it)
    chars = 0

    def flush(final: bool) -> None:
        nonlocal carry, texts, ends, chars
        parts = [carry]
        for ids, end in zip(encode(texts), ends):
            parts.append(np.asarray(ids, np.int64))
            if end:
                parts.append(np.asarray([eos], np.int64))
        stream = np.concatenate(parts)
        n_full = len(stream) // block
        _append_blocks(stream[: n_full * block].reshape(n_full, block), eos, slots, writer)
        carry = stream[n_full * block :]
        if final and len(carry) >= 2:
            _append_blocks(carry[None], eos, slots, writer)
        counter.wrote(n_full * block + (len(carry) if final else 0))
        texts, ends, chars = [], [], 0

    for record in records:
        text = record["text"]
        for piece in _pieces([text] if isinstance(text, str) else text.parts(), exact):
            if chars >= CHARS_PER_CHUNK:  # also inside a long document: its tokens never all wait in lists
                flush(final=False)
            texts.append(piece)
            ends.append(False)
            chars += len(piece)
        ends[-1] = True  # (the document's last piece is still waiting: a flush comes only before a piece)
    flush(final=True)


def _append_blocks(blocks: np.ndarray, slot_id: int, slots: int, writer: StoreWriter) -> None:
    n, width = blocks.shape
    if n == 0:
        return
    ids = np.full((n, slots + width), slot_id, np.int64)
    ids[:, slots:] = blocks
    targets = np.ones((n, slots + width), np.uint8)
    targets[:, : slots + 1] = 0
    writer.append(ids.ravel(), targets.ravel(), np.full(n, slots + width))


def _write_instructions(records, encode, eos: int, template: Template, section: DataSection, slots: int,
                        writer: StoreWriter, spill: Path, counter: _Counter) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Prompt and response tokenized apart (so the response start is exact), prompt tokens masked
    unless train_on_prompt, EOS appended as a target. Returns, per record, its example index (-1:
    dropped) and its byte offset in the spill file."""
    return spilled_chunks(records, RECORDS_PER_CHUNK, spill,
                           lambda chunk: _instruction_chunk(chunk, encode, eos, template, section, slots, writer, counter))  # fmt: skip


def _instruction_chunk(records, encode, eos, template, section, slots, writer, counter) -> list[int]:
    if not records:
        return []
    limit = section.max_length - slots
    prompts = encode([template.render_prompt(r["instruction"], r.get("input", "")) for r in records])
    responses = encode([template.render_response(r["output"]) for r in records])
    example_of, ids, masked, lengths, truncated = [], [], [], [], []
    prefix = [eos] * slots
    for p, r in zip(prompts, responses):
        full = len(p) + len(r) + 1
        keep = min(full, limit)
        first = max(1, 0 if section.train_on_prompt else len(p))  # nothing predicts the first token
        if (full > limit and section.overlong == "drop") or first >= keep:  # too long, or the prompt filled it
            example_of.append(-1)
            continue
        example_of.append(writer.n_examples + len(lengths))
        ids += prefix
        ids += (p + r + [eos])[:keep] if full > limit else p + r + [eos]
        masked.append(slots + first)
        lengths.append(slots + keep)
        truncated.append(full > limit)
    if lengths:
        # each example: its slots and prompt not targets, the rest targets
        counts = np.column_stack([masked, np.subtract(lengths, masked)]).ravel()
        targets = np.repeat(np.tile(np.array([0, 1], np.uint8), len(lengths)), counts)
        writer.append(np.fromiter(ids, writer.dtype, len(ids)), targets, np.asarray(lengths), np.asarray(truncated))
    counter.wrote(int(sum(lengths)))
    return example_of


def _write_chats(records, chats: ChatPool, eos: int, section: DataSection, slots: int, writer: StoreWriter, spill: Path,
                 counter: _Counter, skipped: SkipLog) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each conversation one example: rendered with the chat template, tokenized whole, the loss on
    the assistant turns (data/chat.py), CONVERSATIONS_PER_CHUNK at a time. Returns, per record, its
    example index (-1: dropped; SKIPPED: the template could not render it, with on_bad_record: skip)
    and its byte offset in the spill file."""
    def ahead(chunk: list[dict]) -> int:  # rendered by the workers while the chunk before is written
        last = section.learn_replies == "last"
        return chats.submit([{"messages": last_reply_only(r["messages"]) if last else r["messages"], "tools": r.get("tools")}
                             for r in chunk])  # fmt: skip

    return spilled_chunks(records, CONVERSATIONS_PER_CHUNK, spill,
                           lambda chunk, ticket: _chat_chunk(chunk, chats.collect(ticket), eos, section, slots, writer, counter,
                                                             skipped), ahead)  # fmt: skip


def _chat_chunk(records, encoded_records: list, eos: int, section: DataSection, slots: int, writer: StoreWriter,
                counter: _Counter, skipped: SkipLog) -> list[int]:  # fmt: skip
    limit = section.max_length - slots
    example_of, ids, targets, lengths, truncated = [], [], [], [], []
    for record, encoded in zip(records, encoded_records):
        if isinstance(encoded, str):  # the template could not render it: a bad record
            message = f"{record['origin']}: {encoded}"
            if section.on_bad_record == "fail":
                raise DataError(f"{message} (fix the record or the template, or set data.on_bad_record: skip to skip such records)")
            skipped.add(message)
            example_of.append(SKIPPED)
            continue
        row, row_targets = encoded
        cut = len(row) > limit
        row, row_targets = row[:limit], row_targets[:limit]
        if (cut and section.overlong == "drop") or not row_targets.any():
            example_of.append(-1)
            continue
        example_of.append(writer.n_examples + len(lengths))
        ids += [np.full(slots, eos, np.int64), row]
        targets += [np.zeros(slots, np.uint8), row_targets]
        lengths.append(slots + len(row))
        truncated.append(cut)
    if lengths:
        writer.append(np.concatenate(ids), np.concatenate(targets), np.asarray(lengths), np.asarray(truncated))
    counter.wrote(int(sum(lengths)))
    return example_of
