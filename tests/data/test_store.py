"""The token store: the same examples as tokenizing record by record, the shared cache (hits,
rebuilds, one builder at a time), and the fast encoder's ids against the tokenizer's."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gptj_tune.data import prepare_data, split_indices
from gptj_tune.data.build import _pieces
from gptj_tune.data.encode import _added_token_cutter, _encode_cut, _tiktoken_encoding, encoder
from gptj_tune.data.formats import read_source
from gptj_tune.errors import DataError
from gptj_tune.data.templates import BUILTIN_TEMPLATES
from gptj_tune.data.tokens import IGNORE, tokenize_instructions, tokenize_text
from gptj_tune.recipe import DataSection, SourceSection


def examples_of(rows) -> Counter:
    """Each row split back into examples at position restarts."""
    out = Counter()
    for r in rows:
        ids, labels, positions = (np.asarray(x).tolist() for x in (r.input_ids, r.labels, r.position_ids))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            out[(tuple(ids[a:b]), tuple(labels[a:b]))] += 1
    return out


@pytest.mark.parametrize("slots", [0, 3])
def test_store_holds_exactly_the_examples_of_record_by_record_tokenizing(shared_data, gpt2_tokenizer, tmp_path, slots):
    """Instruction and text sources through the store give, split by split, the examples the
    record-by-record path (tokens.py) gives for the same split, prompt slots in front."""
    alpaca = SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json"), limit=400)
    novel = shared_data / "domain" / "alice_in_wonderland_pg11.txt"
    text = SourceSection(format="text", path=str(novel))
    section = DataSection(sources=[alpaca, text], max_length=128, eval_fraction=0.05, on_bad_record="skip",
                          overlong="drop", cache_dir=str(tmp_path))  # fmt: skip
    data = prepare_data(section, gpt2_tokenizer, prompt_slots=slots)

    def with_slots(examples):
        return Counter((tuple([gpt2_tokenizer.eos_token_id] * slots + e.input_ids), tuple([IGNORE] * slots + e.labels))
                       for e in examples)  # fmt: skip

    records = read_source(alpaca, 0, "skip").records
    train_idx, held_idx = split_indices(len(records), 0.05, 1000, 0)
    args = (gpt2_tokenizer, BUILTIN_TEMPLATES["alpaca"], 128 - slots, False, "drop")
    train, stats = tokenize_instructions([records[i] for i in train_idx], *args)
    held, _ = tokenize_instructions([records[i] for i in held_idx], *args)
    blocks, _ = tokenize_text(read_source(text, 1, "fail").records, gpt2_tokenizer, 128 - slots)
    b_train, b_held = split_indices(len(blocks), 0.05, 1000, 0)
    expected_train = with_slots(train) + with_slots([blocks[i] for i in b_train])
    expected_held = with_slots(held) + with_slots([blocks[i] for i in b_held])
    assert examples_of(data.train_rows) == expected_train
    assert examples_of(data.eval_rows) == expected_held
    assert data.eval_records == [records[i] for i in held_idx]
    assert data.train_stats.dropped == stats.dropped > 0
    assert data.train_stats.examples == len(train) + len(b_train)
    assert data.train_stats.target_tokens == sum(sum(x != IGNORE for x in e.labels) for e in train) + \
        sum(sum(x != IGNORE for x in blocks[i].labels) for i in b_train)  # fmt: skip
    assert all(len(r.input_ids) <= 128 for r in data.train_rows) and data.padding_efficiency > 0.9
    assert data.store.meta["encoder"] == "tiktoken"


def test_second_prepare_reads_the_cache_and_a_changed_file_or_option_rebuilds(tmp_path, shared_data, gpt2_tokenizer):
    corpus = tmp_path / "books"
    corpus.mkdir()
    for f in sorted((shared_data / "domain").glob("*.txt"))[:2]:
        (corpus / f.name).write_bytes(f.read_bytes())
    section = DataSection(sources=[SourceSection(format="text", path=str(corpus))], max_length=256, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(section, gpt2_tokenizer)
    again = prepare_data(section, gpt2_tokenizer)
    assert first.built and not again.built and again.store.folder == first.store.folder
    assert examples_of(again.train_rows) == examples_of(first.train_rows)
    longer = prepare_data(section.model_copy(update={"max_length": 512}), gpt2_tokenizer)
    assert longer.built and longer.store.folder != first.store.folder
    book = sorted(corpus.iterdir())[0]
    book.write_text(book.read_text() + "\nOne more line.\n")
    changed = prepare_data(section, gpt2_tokenizer)
    assert changed.built and changed.train_stats.tokens > first.train_stats.tokens
    assert not list((tmp_path / "cache").glob(".tmp-*")) and not list((tmp_path / "cache").glob("*.building"))


def test_a_builder_in_progress_is_waited_for_and_a_dead_one_taken_over(tmp_path, shared_data, gpt2_tokenizer):
    from gptj_tune.data import cache

    section = DataSection(sources=[SourceSection(format="dolly", path=str(shared_data / "dolly" / "dolly_sample_train20.jsonl"))],
                          template="dolly", max_length=256, cache_dir=str(tmp_path))  # fmt: skip
    key = cache.cache_key(section, gpt2_tokenizer, 0)
    lock = tmp_path / f"{key}.building"
    lock.write_text('{"host": "elsewhere", "pid": 1}')  # a live builder: touched just now
    got, messages = {}, []
    waiter = threading.Thread(target=lambda: got.update(data=prepare_data(section, gpt2_tokenizer, waiting=messages.append)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not (tmp_path / key).exists()
    assert messages == [f"another process (pid 1 on elsewhere) is preparing this data; waiting for {tmp_path / key}"]
    lock.unlink()  # that builder gave up without an entry: the waiter builds it
    waiter.join(60)
    assert got["data"].built and (tmp_path / key).is_dir()

    other = section.model_copy(update={"max_length": 128})
    stale = tmp_path / f"{cache.cache_key(other, gpt2_tokenizer, 0)}.building"
    stale.write_text('{"host": "gone", "pid": 2}')
    old = time.time() - cache.STALE_AFTER - 5
    os.utime(stale, (old, old))
    assert prepare_data(other, gpt2_tokenizer).built and not stale.exists()


def test_a_builder_that_died_on_this_machine_is_taken_over_at_once_and_its_temp_folder_removed(tmp_path, shared_data, gpt2_tokenizer):
    """A lock left by a process of this host that has ended is taken over without waiting
    STALE_AFTER, and the half-built folder that builder left is removed."""
    import socket
    import subprocess
    import sys

    from gptj_tune.data import cache

    section = DataSection(sources=[SourceSection(format="dolly", path=str(shared_data / "dolly" / "dolly_sample_train20.jsonl"))],
                          template="dolly", max_length=256, cache_dir=str(tmp_path))  # fmt: skip
    key = cache.cache_key(section, gpt2_tokenizer, 0)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / f"{key}.building").write_text(json.dumps({"host": socket.gethostname(), "pid": int(ended.stdout)}))
    orphan = tmp_path / f".tmp-{key}-deadbeef"
    orphan.mkdir()
    (orphan / "tokens.bin").write_bytes(b"\0" * 4096)
    started = time.monotonic()
    data = prepare_data(section, gpt2_tokenizer, waiting=lambda m: pytest.fail(f"waited: {m}"))
    assert data.built and time.monotonic() - started < cache.STALE_AFTER / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]  # no lock, no temp folder


def test_a_stop_signal_while_the_build_lock_is_being_taken_leaves_no_lock(tmp_path, shared_data, gpt2_tokenizer, monkeypatch):
    """Ctrl-C or SIGTERM lands between creating `KEY.building` and holding it (the heartbeat's
    start, here): the lock file goes with the stop, so nothing waits on it afterwards."""
    from gptj_tune.data import cache

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.Heartbeat, "start", interrupted)
    section = DataSection(sources=[SourceSection(format="dolly", path=str(shared_data / "dolly" / "dolly_sample_train20.jsonl"))],
                          template="dolly", max_length=256, cache_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        prepare_data(section, gpt2_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_the_fast_encoder_gives_the_tokenizers_ids(shared_data, gpt2_tokenizer):
    encode, name = encoder(gpt2_tokenizer)
    assert name == "tiktoken"
    texts = [r["instruction"] + "\n" + r["output"] for r in read_source(
        SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json")), 0, "skip").records]  # fmt: skip
    marked = ["ends with the marker<|endoftext|>and goes on", "<|endoftext|><|endoftext|>", "<|endoftext|>starts",
              "ends <|endoftext|>", " <|endoftext|> \n\n<|endoftext|>\n### User:", "<|endoftext|"]  # the last one: not whole
    texts += ["naïve café — 東京 🙂\t\ttabs  and   spaces\r\n", *marked, "", " "]
    reference = [e.ids for e in gpt2_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert encode(texts) == reference
    assert reference[-3 - len(marked) + 1].count(gpt2_tokenizer.eos_token_id) == 1  # the written-out marker is the one token
    # texts with the marker are cut around it and encoded with tiktoken, not by the tokenizer
    fast, cut = _tiktoken_encoding(gpt2_tokenizer), _added_token_cutter(gpt2_tokenizer)
    assert cut is not None and _encode_cut(fast, cut, gpt2_tokenizer.get_added_vocab(), marked, 2) == reference[-2 - len(marked) : -2]


def test_a_long_document_cut_into_pieces_tokenizes_as_whole(shared_data, gpt2_tokenizer):
    text = (shared_data / "domain" / "pride_and_prejudice_pg1342.txt").read_text(encoding="utf-8-sig")
    pieces = list(_pieces([text], exact_cuts=True))
    assert len(pieces) > 5 and "".join(pieces) == text
    encode, _ = encoder(gpt2_tokenizer)
    assert [t for p in encode(pieces) for t in p] == gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_long_documents_are_tokenized_a_chunk_at_a_time_into_the_same_store(tmp_path, shared_data, gpt2_tokenizer, monkeypatch):
    """A document is flushed to the store every CHARS_PER_CHUNK characters, also in its middle (a
    391 MB .txt used to wait whole as token lists: 6.9 GB peak, now 1.9 GB; see docs): the store's
    files are the same byte for byte as with chunks larger than the corpus."""
    import gptj_tune.data.build as build

    def store(chunk: int, name: str) -> dict[str, bytes]:
        monkeypatch.setattr(build, "CHARS_PER_CHUNK", chunk)
        section = DataSection(sources=[SourceSection(format="text", path=str(shared_data / "domain"))], max_length=512,
                              eval_fraction=0.05, cache_dir=str(tmp_path / name))  # fmt: skip
        folder = prepare_data(section, gpt2_tokenizer).store.folder
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".bin", ".npy")}

    whole = store(10**9, "whole")
    flushes = []
    append_blocks = build._append_blocks
    monkeypatch.setattr(build, "_append_blocks", lambda *args: flushes.append(1) or append_blocks(*args))
    chunked = store(100_000, "chunked")  # the four novels: 174k to 738k characters each, 1.96M in all
    assert len(flushes) >= 12  # a flush every 100k+ characters (whole 64k pieces), inside documents too (by document: 6)
    assert set(whole) >= {"tokens.bin", "targets.bin", "train.npy", "eval.npy"} and len(whole["tokens.bin"]) > 900_000
    assert chunked == whole


def test_a_text_file_is_read_a_part_at_a_time_into_the_same_store(tmp_path, shared_data, gpt2_tokenizer, monkeypatch):
    """A .txt document is read TEXT_PART_CHARS at a time (a corpus file of gigabytes used to be held
    whole, twice over while decoded): with parts far smaller than the novels, a BOM and Windows line
    ends cut between parts, the store is the same byte for byte as with one part per file."""
    import gptj_tune.data.formats as formats

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    alice = (shared_data / "domain" / "alice_in_wonderland_pg11.txt").read_bytes().removeprefix(b"\xef\xbb\xbf")
    (corpus / "a.txt").write_bytes(b"\xef\xbb\xbf" + alice.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    (corpus / "b.txt").write_bytes((shared_data / "domain" / "pride_and_prejudice_pg1342.txt").read_bytes())
    (corpus / "c.txt").write_bytes("naïve café — 東京 🙂\r\nline two\rline three".encode())
    parts = []

    def store(part_chars: int, name: str) -> dict[str, bytes]:
        monkeypatch.setattr(formats, "TEXT_PART_CHARS", part_chars)
        section = DataSection(sources=[SourceSection(format="text", path=str(corpus))], max_length=256,
                              eval_fraction=0.05, cache_dir=str(tmp_path / name))  # fmt: skip
        folder = prepare_data(section, gpt2_tokenizer).store.folder
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".bin", ".npy")}

    whole = store(10**9, "whole")
    text_parts = formats.TextFile.parts
    monkeypatch.setattr(formats.TextFile, "parts", lambda self: (parts.append(p) or p for p in text_parts(self)))
    assert store(30_001, "parts") == whole
    assert len(parts) > 25 and max(map(len, parts)) == 30_001 and any(p.startswith("\n") for p in parts)
    # Read back as records, each file is its text with the BOM gone and every line end a newline.
    records = read_source(SourceSection(format="text", path=str(corpus)), 0, "fail").records
    assert records[0]["text"] == alice.decode("utf-8-sig").replace("\r\n", "\n")
    assert records[2]["text"] == "naïve café — 東京 🙂\nline two\nline three"


def test_a_text_file_that_is_not_utf8_or_blank_is_named_as_checked_a_block_at_a_time(tmp_path, monkeypatch):
    """The check before a .txt file is read goes a block at a time; a character cut between blocks
    is still text, and the line and byte of the first one that is not are the file's own."""
    import gptj_tune.data.formats as formats

    monkeypatch.setattr(formats, "_CHECK_BYTES", 7)
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffé東🙂\nabc".encode())  # multibyte characters across the 7-byte blocks
    assert read_source(SourceSection(format="text", path=str(good)), 0, "fail").records[0]["text"] == "é東🙂\nabc"
    monkeypatch.setattr(formats, "_CHECK_BYTES", 3)  # a first block that is the BOM alone is not the file's end
    assert read_source(SourceSection(format="text", path=str(good)), 0, "fail").records[0]["text"] == "é東🙂\nabc"
    monkeypatch.setattr(formats, "_CHECK_BYTES", 7)
    bad = tmp_path / "bad.txt"
    data = "one\ntwo 東\nthree ".encode() + b"\xe6\x9d" + b" four\n"  # a character cut short on line 3
    bad.write_bytes(data)
    at = data.rindex(bytes([0xE6, 0x9D])) + 1
    with pytest.raises(DataError, match=rf"{bad}:3: not UTF-8 text \(byte {at} of the file is 0xe6\); the document is one record"):
        read_source(SourceSection(format="text", path=str(bad)), 0, "fail")
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\xef\xbb\xbf" + b" \r\n\t\n" * 5)
    with pytest.raises(DataError, match=rf"{blank}:1: field `text` is empty"):
        read_source(SourceSection(format="text", path=str(blank)), 0, "fail")


def test_rows_read_from_the_mapping_are_what_batches_collate(tmp_path, shared_data, gpt2_tokenizer):
    from gptj_tune.data.batches import Batches

    section = DataSection(sources=[SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json"), limit=200)],
                          max_length=256, cache_dir=str(tmp_path))  # fmt: skip
    data = prepare_data(section, gpt2_tokenizer)
    assert isinstance(data.store.tokens, np.memmap) and data.store.tokens.dtype == np.uint16
    batch = Batches(data.train_rows, 4, gpt2_tokenizer.pad_token_id, seed=0, shuffle=False).get(0)
    first = data.train_rows[0]
    n = len(first.input_ids)
    assert batch["input_ids"][0, :n].tolist() == first.input_ids.tolist()
    assert batch["labels"][0, :n].tolist() == first.labels.tolist()
    assert Path(data.store.folder).parent == tmp_path


def test_a_dataset_loaded_through_datasets_streams_row_by_row(tmp_path):
    """A hub source goes through `datasets.load_dataset(..., streaming=True)`: rows come one at a
    time (a dataset larger than memory or disk goes through). No hub here: the same call on a local
    dataset folder, which `datasets` reads the way it reads a downloaded repository."""
    import json as _json

    from gptj_tune.data.formats import _hub_rows

    folder = tmp_path / "my-dataset"
    folder.mkdir()
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    got = list(_hub_rows(SourceSection(format="alpaca", path=str(folder)), "data.sources[0]"))
    assert [dict(r) for _, r in got] == rows
    assert got[0][0] == f"{folder}[train] row 1" and got[-1][0] == f"{folder}[train] row 5"


def test_a_hub_dataset_with_subsets_reads_the_one_named_and_lists_them_when_none_is(tmp_path):
    """`subset` is load_dataset's configuration name (allenai/c4's `en`): a local dataset folder
    whose README declares two configurations, read as `datasets` reads a downloaded repository."""
    from gptj_tune.data.formats import _hub_rows, iter_records, SkipLog

    folder = tmp_path / "two-languages"
    for name, row in (("en", {"instruction": "Say hi.", "output": "hi"}), ("de", {"instruction": "Sag hallo.", "output": "hallo"})):
        (folder / name).mkdir(parents=True)
        (folder / name / "train.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/train.jsonl\n" for n in ("en", "de")) + "---\n")  # fmt: skip
    got = list(_hub_rows(SourceSection(format="alpaca", path=str(folder), subset="de"), "data.sources[0]"))
    assert got == [(f"{folder}[de, train] row 1", {"instruction": "Sag hallo.", "output": "hallo"})]
    for subset, message in ((None, "has several subsets"), ("fr", "has no subset 'fr'")):
        with pytest.raises(DataError) as raised:
            list(_hub_rows(SourceSection(format="alpaca", path=str(folder), subset=subset), "data.sources[0]"))
        assert str(raised.value).startswith(f"data.sources[0].subset: {folder} {message} (")
        assert str(raised.value).endswith("set data.sources[0].subset to one of ['en', 'de']")
    with pytest.raises(DataError, match=r"data.sources\[0\].subset: .* is local files, read as they are"):
        list(iter_records(SourceSection(format="alpaca", path=str(folder / "en"), subset="en"), 0, "fail", SkipLog()))
