"""Data pipeline on the real Alpaca / Dolly files with the real GPT-2 tokenizer."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from gptj_tune.data import prepare_data, split_indices
from gptj_tune.data.formats import read_source
from gptj_tune.data.templates import BUILTIN_TEMPLATES
from gptj_tune.data.pack import _best_fit_decreasing, make_rows, pack_examples
from gptj_tune.data.tokens import IGNORE, tokenize_instructions, tokenize_text
from gptj_tune.errors import DataError
from gptj_tune.recipe import DataSection, SourceSection

ALPACA = BUILTIN_TEMPLATES["alpaca"]


def alpaca_records(shared_data, n=None):
    source = SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json"), limit=n)
    return read_source(source, 0, "skip").records


def test_alpaca_reader_keeps_fields_and_lines(shared_data):
    path = shared_data / "alpaca" / "alpaca_2k.json"
    # The real file has 4 records with an empty output: the default is to fail, naming the line.
    with pytest.raises(DataError, match=rf"{path}:1422: field `output` is empty \(set data.on_bad_record: skip"):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "fail")
    read = read_source(SourceSection(format="alpaca", path=str(path)), 0, "skip")
    raw = [x for x in json.loads(path.read_text()) if x["output"].strip()]
    assert len(read.records) == 1996 and len(read.skipped) == 4
    assert [(r["instruction"], r["input"], r["output"]) for r in read.records] == [
        (x["instruction"], x["input"], x["output"]) for x in raw
    ]
    assert read.records[0]["origin"].endswith("alpaca_2k.json:2")  # indent-4 array: first record on line 2
    assert read.records[1]["origin"].endswith("alpaca_2k.json:7")


def test_label_masking_counts_are_exact(shared_data, gpt2_tokenizer):
    records = alpaca_records(shared_data, n=500)
    examples, stats = tokenize_instructions(records, gpt2_tokenizer, ALPACA, 4096, False, "truncate")
    assert stats.truncated == stats.dropped == 0 and len(examples) == 500
    expected_targets = 0
    for record, example in zip(records, examples):
        prompt = gpt2_tokenizer(ALPACA.render_prompt(record["instruction"], record["input"]))["input_ids"]
        response = gpt2_tokenizer(record["output"])["input_ids"] + [gpt2_tokenizer.eos_token_id]
        assert example.input_ids == prompt + response
        assert example.labels == [IGNORE] * len(prompt) + response  # every prompt token masked, EOS learned
        expected_targets += len(response)
    assert stats.target_tokens == expected_targets
    with_input = next(r for r in records if r["input"])
    assert "### Input:\n" + with_input["input"] in ALPACA.render_prompt(with_input["instruction"], with_input["input"])


def test_train_on_prompt_learns_everything_but_the_first_token(shared_data, gpt2_tokenizer):
    records = alpaca_records(shared_data, n=50)
    examples, _ = tokenize_instructions(records, gpt2_tokenizer, ALPACA, 4096, True, "truncate")
    for e in examples:
        assert e.labels[0] == IGNORE and e.labels[1:] == e.input_ids[1:]


def test_dolly_sample_with_dolly_template(shared_data, gpt2_tokenizer):
    source = SourceSection(format="dolly", path=str(shared_data / "dolly" / "dolly_sample_train20.jsonl"))
    records = read_source(source, 0, "fail").records
    assert len(records) == 20 and all("category" in r for r in records)
    dolly = BUILTIN_TEMPLATES["dolly"]
    examples, stats = tokenize_instructions(records, gpt2_tokenizer, dolly, 4096, False, "truncate")
    end = gpt2_tokenizer("\n\n### End")["input_ids"]
    for r, e in zip(records, examples):
        targets = [t for t in e.labels if t != IGNORE]
        assert targets[-1] == gpt2_tokenizer.eos_token_id and targets[-1 - len(end) : -1] == end
        assert gpt2_tokenizer.decode(targets[: -1 - len(end)]) == r["output"]
        if r["input"]:
            assert "Input:\n" + r["input"] in gpt2_tokenizer.decode(e.input_ids)


def test_packing_keeps_every_token_and_respects_max_length(shared_data, gpt2_tokenizer):
    examples, _ = tokenize_instructions(alpaca_records(shared_data), gpt2_tokenizer, ALPACA, 512, False, "truncate")
    rows = make_rows(examples, 512, packing=True)
    assert all(len(r.input_ids) <= 512 for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)
    packed = Counter()
    for r in rows:  # split each row back into examples at position restarts
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        for a, b in zip(starts, starts[1:]):
            packed[(tuple(r.input_ids[a:b]), tuple(r.labels[a:b]))] += 1
    assert packed == Counter((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    total = sum(len(r.input_ids) for r in rows)
    efficiency = total / (512 * len(rows))
    assert efficiency > 0.98, efficiency
    assert len(rows) < len(_best_fit_decreasing([len(e.input_ids) for e in examples], 512))
    few = examples[:240]  # a small dataset: as few rows as its tokens allow (best fit leaves one more)
    assert len(make_rows(few, 512, packing=True)) == -(-sum(len(e.input_ids) for e in few) // 512)


def test_pack_examples_is_best_fit_decreasing():
    bins = pack_examples([5, 3, 4, 2, 6, 1], capacity=7)
    assert sorted(sorted(b) for b in bins) == [[0, 3], [1, 2], [4, 5]]  # 5+2, 3+4, 6+1: no waste
    with pytest.raises(ValueError, match="more than the capacity"):
        pack_examples([9], capacity=7)


def test_packing_empties_the_last_bin_that_best_fit_decreasing_leaves():
    # Best-fit decreasing: 5+4, 3+3+3, 2 (three bins); two are enough: 5+3+2 and 4+3+3.
    assert len(_best_fit_decreasing([3, 3, 3, 5, 4, 2], 10)) == 3
    bins = pack_examples([3, 3, 3, 5, 4, 2], capacity=10)
    assert sorted(sum([3, 3, 3, 5, 4, 2][i] for i in b) for b in bins) == [10, 10]


@pytest.mark.parametrize("seed", range(20))
def test_packing_keeps_every_example_once_within_capacity_and_never_adds_bins(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(30, 200)]) for _ in range(rng.randint(1, 300))]
    bins = pack_examples(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert -(-sum(lengths) // 256) <= len(bins) <= len(_best_fit_decreasing(lengths, 256))
    assert pack_examples(lengths, 256) == bins  # deterministic


def _pairwise_best_trade(bins, r_bin, t, need):
    """The trade `_make_room` wants, found pair by pair: bins S with room in id order, R's members then
    S's in list order; 0 < delta <= S's room; the smallest delta that is enough, else the largest;
    the first found among equals."""
    best = None
    for s_bin in sorted(b for b in range(len(bins.fill)) if bins.capacity - bins.fill[b] > 0 and b not in (r_bin, t)):
        gap = bins.capacity - bins.fill[s_bin]
        for r in bins.members(r_bin):
            for s in bins.members(s_bin):
                delta = int(bins.lengths[r] - bins.lengths[s])
                if not 0 < delta <= gap:
                    continue
                if best is None or ((delta >= need) != (best[0] >= need) and delta >= need) or (
                    (delta >= need) == (best[0] >= need) and (delta < best[0] if delta >= need else delta > best[0])
                ):
                    best = (delta, r, s_bin, s)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_trade_search_over_all_bins_at_once_finds_the_pairwise_searchs_trade(seed, monkeypatch):
    """`_make_room` searches every bin at once with numpy (13x faster on Alpaca); the trade it finds,
    also across blocks of the search, is the one a pair-by-pair search finds, so packing is unchanged."""
    from gptj_tune.data.pack import _Bins, _Where

    monkeypatch.setattr(_Where, "CHUNK", 7)  # several blocks even for a few examples
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, int(rng.integers(20, 400)))
    bins = _Bins.best_fit_decreasing(lengths, 256)
    where = _Where(bins)
    for _ in range(40):
        r_bin, t = (int(b) for b in rng.choice(len(bins.fill), 2, replace=False))
        need = int(rng.integers(1, 80))
        found, budget = where.best_trade(r_bin, t, need, 10**9)
        assert found == _pairwise_best_trade(bins, r_bin, t, need)
        if found is not None:  # and keep going from the state the trade leaves
            where.trade(r_bin, *found[1:])


def test_overlong_examples_truncated_or_dropped_with_counts(shared_data, gpt2_tokenizer):
    records = alpaca_records(shared_data, n=300)
    lengths = [len(e.input_ids) for e in tokenize_instructions(records, gpt2_tokenizer, ALPACA, 10**6, False, "drop")[0]]
    over = sum(n > 96 for n in lengths)
    kept, stats = tokenize_instructions(records, gpt2_tokenizer, ALPACA, 96, False, "drop")
    assert stats.dropped == over and len(kept) == 300 - over
    cut, stats = tokenize_instructions(records, gpt2_tokenizer, ALPACA, 96, False, "truncate")
    assert stats.truncated + stats.dropped == over and all(len(e.input_ids) <= 96 for e in cut)
    assert all(any(t != IGNORE for t in e.labels) for e in cut)  # no example without a target survives


def test_malformed_jsonl_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "output": "d"},  # input is optional
        "{not json",
        {"instruction": "e", "input": ""},
        {"instruction": "f", "input": "", "output": "  "},
        {"instruction": 3, "input": "", "output": "x"},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    source = SourceSection(format="alpaca", path=str(path))
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON .*on_bad_record: skip"):
        read_source(source, 0, "fail")
    read = read_source(source, 0, "skip")
    assert len(read.records) == 2 and len(read.skipped) == 4
    assert any(f"{path}:4: missing field `output`" in s for s in read.skipped)
    assert any(f"{path}:5: field `output` is empty" in s for s in read.skipped)
    assert any(f"{path}:6: field `instruction` must be a string, got int" in s for s in read.skipped)


def test_bytes_and_text_no_reader_can_take_are_records_named_by_file_and_line(tmp_path):
    """A JSONL line that is not UTF-8, a field holding half a surrogate pair (JSON allows "\\ud800",
    no tokenizer takes it), and a line nested 100,000 levels deep: each one line naming file and
    line, or skipped and counted; the lines around them are read."""
    good = json.dumps({"instruction": "a", "input": "", "output": "b"}).encode()
    lines = [good, b'{"instruction": "caf\xe9", "output": "x"}', good, b'{"instruction": "\\ud800", "output": "x"}',
             b"[" * 100_000 + b"]" * 100_000, good]  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = SourceSection(format="alpaca", path=str(path))
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text \(byte 21 of the line is 0xe9\).*on_bad_record: skip"):
        read_source(source, 0, "fail")
    read = read_source(source, 0, "skip")
    assert [r["origin"] for r in read.records] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert any(f"{path}:4: field `instruction` holds '\\ud800' at character 1, half of a UTF-16 surrogate pair" in s
               for s in read.skipped)  # fmt: skip
    assert any(f"{path}:5: JSON nested too deeply to read" in s for s in read.skipped) and len(read.skipped) == 3
    array = tmp_path / "bad.json"
    array.write_bytes(b'[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "\xff"}\n]\n')
    with pytest.raises(DataError, match=rf"{array}:3: not UTF-8 text \(byte 74 of the file is 0xff\)"):
        read_source(SourceSection(format="alpaca", path=str(array)), 0, "skip")


def test_malformed_json_array_names_record_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c", "input": ""}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: missing field `output`"):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "fail")


def test_jsonl_field_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "2+2?", "ctx": "math", "a": "4"}) + "\n")
    source = SourceSection(format="jsonl", path=str(path), prompt_field="q", input_field="ctx", response_field="a")
    [record] = read_source(source, 0, "fail").records
    assert (record["instruction"], record["input"], record["output"]) == ("2+2?", "math", "4")


def test_text_format_on_a_novel(shared_data, gpt2_tokenizer):
    path = shared_data / "domain" / "alice_in_wonderland_pg11.txt"
    records = read_source(SourceSection(format="text", path=str(path)), 0, "fail").records
    assert not records[0]["text"].startswith("\ufeff") and "\r" not in records[0]["text"]
    examples, stats = tokenize_text(records, gpt2_tokenizer, 256)
    stream = gpt2_tokenizer(records[0]["text"])["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert sum(len(e.input_ids) for e in examples) == len(stream)
    assert all(len(e.input_ids) == 256 for e in examples[:-1])
    assert all(e.labels[0] == IGNORE and e.labels[1:] == e.input_ids[1:] for e in examples)


def test_hub_dataset_offline_is_a_clear_error():
    source = SourceSection(format="alpaca", path="tatsu-lab/alpaca")
    with pytest.raises(DataError, match=r"data.sources\[0\].path: 'tatsu-lab/alpaca' is not a local file or folder "
                                        r"\(a relative path is looked for beside the recipe file, then in the current directory\), "
                                        r"and loading it as a hub dataset failed"):
        read_source(source, 0, "fail")
    with pytest.raises(DataError, match=r"'/no/such/books' is not a local file or folder, and loading"):
        read_source(SourceSection(format="text", path="/no/such/books"), 0, "fail")


def test_split_is_deterministic_and_disjoint():
    train, held = split_indices(1000, 0.05, 1000, seed=3)
    assert len(held) == 50 and not set(train) & set(held) and len(train) + len(held) == 1000
    assert (train, held) == split_indices(1000, 0.05, 1000, seed=3)
    assert held != split_indices(1000, 0.05, 1000, seed=4)[1]
    assert len(split_indices(1000, 0.5, 20, seed=3)[1]) == 20


def test_prepare_data_mixes_weighted_sources(shared_data, gpt2_tokenizer):
    alpaca = SourceSection(format="alpaca", path=str(shared_data / "alpaca" / "alpaca_2k.json"), limit=200, weight=2)
    dolly = SourceSection(format="dolly", path=str(shared_data / "dolly" / "dolly_sample_train20.jsonl"), weight=0.5)
    section = DataSection(sources=[alpaca, dolly], eval_fraction=0.1, max_length=1024, on_bad_record="skip")
    data = prepare_data(section, gpt2_tokenizer)
    assert len(data.eval_records) == 20 + 2
    train_alpaca, train_dolly = 180, 18
    rows_tokens = sum(len(r.input_ids) for r in data.train_rows)
    assert data.train_stats.examples == train_alpaca + train_dolly  # before weighting
    examples_in_rows = sum(int((r.position_ids == 0).sum()) for r in data.train_rows)
    assert examples_in_rows == 2 * train_alpaca + round(0.5 * train_dolly)
    assert rows_tokens > 0 and data.padding_efficiency > 0.9


def _lines_of_items(text: str) -> list[int]:
    """The line each top-level item of a JSON array starts on, decoding the text whole."""
    decoder, pos, lines = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        pos = re.compile(r"[ \t\r\n,]*").match(text, pos).end()
        if text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        pos = decoder.raw_decode(text, pos)[1]


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_a_json_array_is_read_a_block_at_a_time_with_its_items_and_lines_as_whole(tmp_path, shared_data, monkeypatch, block):
    """A JSON array file (Alpaca's format, ShareGPT dumps) is decoded a block at a time, no longer
    whole: with blocks shorter than an item (cutting characters, escapes, numbers and strings), the
    items and their lines are those of the file read whole, and errors name the file's own line."""
    import gptj_tune.data.json_array as json_array

    monkeypatch.setattr(json_array, "BLOCK_BYTES", block)
    items = [{"instruction": f"naïve 東京 🙂 \\u00e9 \"{i}\"\\\\", "input": "", "output": "x" * (i * 37 % 300)} for i in range(60)]
    text = "\ufeff[\r\n" + ",\n".join(json.dumps(x, ensure_ascii=i % 2 == 0, indent=i % 3 or None) for i, x in enumerate(items))
    text += ", 12345678901234567890, 1.5e300, -0.25, true, null, [1, [2]]\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    rows = list(json_array.json_array_rows(path))
    assert [item for _, item in rows] == json.loads(text.removeprefix("\ufeff"))
    assert [origin for origin, _ in rows] == [f"{path}:{n}" for n in _lines_of_items(text)]
    if block == 64:  # the shared Alpaca file: 2,000 items, each on the line it starts on
        alpaca = shared_data / "alpaca" / "alpaca_2k.json"
        rows = list(json_array.json_array_rows(alpaca))
        whole = alpaca.read_text(encoding="utf-8-sig")
        assert [item for _, item in rows] == json.loads(whole) and [o for o, _ in rows] == [f"{alpaca}:{n}" for n in _lines_of_items(whole)]
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace('"output": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"', '"output": "x" "y"', 1), encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(bad.read_text(encoding="utf-8-sig"))
    with pytest.raises(DataError, match=rf"{bad}:{whole.value.lineno}: not valid JSON \(Expecting ',' delimiter at column "
                                        rf"{whole.value.colno}\)"):  # fmt: skip
        list(json_array.json_array_rows(bad))
    bad.write_text(text.rstrip().removesuffix("]"), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}: the JSON array is not closed with `]`"):
        list(json_array.json_array_rows(bad))
