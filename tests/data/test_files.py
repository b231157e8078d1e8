"""Data files as they come: gzip, bzip2, xz and zstd compressed JSONL, JSON arrays and .txt books,
and Parquet files (a hub dataset downloaded as it is stored), read as streams into the same token
store as the plain files give."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest
import zstandard

from gptj_tune.data import prepare_data
from gptj_tune.data.formats import read_source
from gptj_tune.errors import DataError
from gptj_tune.recipe import DataSection, SourceSection



def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".xz":
        return lzma.compress(data)
    if suffix == ".zst":  # in frames of 64 KB, as `zstd -B` or pzstd write a large file: one stream all the same
        return b"".join(zstandard.ZstdCompressor().compress(data[i : i + 65536]) for i in range(0, len(data), 65536))
    raise ValueError(suffix)


def store_files(section: DataSection, tokenizer) -> dict[str, bytes]:
    folder = prepare_data(section, tokenizer).store.folder
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".bin", ".npy")}


def section_of(path, format: str, cache, **extra) -> DataSection:
    return DataSection(sources=[SourceSection(format=format, path=str(path), **extra)], max_length=256, eval_fraction=0.05,
                       on_bad_record="skip", cache_dir=str(cache))  # fmt: skip


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory, shared_data, gpt2_tokenizer):
    """A JSON array (Alpaca's own file), the same records as JSONL, and a novel as .txt: (format,
    name, bytes, the store the plain file gives)."""
    tmp = tmp_path_factory.mktemp("plain")
    alpaca = shared_data / "alpaca" / "alpaca_2k.json"
    lines = "".join(json.dumps(r) + "\n" for r in json.loads(alpaca.read_text()))
    novel = shared_data / "domain" / "alice_in_wonderland_pg11.txt"
    out = []
    for n, (format, name, data) in enumerate([("alpaca", "alpaca_2k.json", alpaca.read_bytes()),
                                              ("alpaca", "alpaca_2k.jsonl", lines.encode()), ("text", "alice.txt", novel.read_bytes())]):  # fmt: skip
        path = tmp / str(n) / name
        path.parent.mkdir()
        path.write_bytes(data)
        out.append((format, name, data, store_files(section_of(path, format, tmp / f"cache{n}"), gpt2_tokenizer)))
    return out


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_give_the_plain_files_store(tmp_path, gpt2_tokenizer, plain_files, suffix):
    for n, (format, name, data, want) in enumerate(plain_files):
        packed = tmp_path / str(n) / (name + suffix)
        packed.parent.mkdir()
        packed.write_bytes(compress(data, suffix))
        assert len(want["tokens.bin"]) > 50_000
        assert store_files(section_of(packed, format, tmp_path / f"cache{n}"), gpt2_tokenizer) == want
        if name.endswith(".jsonl"):  # a folder of them is read too
            assert store_files(section_of(packed.parent, format, tmp_path / f"cache{n}-folder"), gpt2_tokenizer) == want


def test_parquet_files_give_the_jsonl_store(tmp_path, shared_data, gpt2_tokenizer):
    """Instructions and conversations (turns as a list of structs, as the hub stores them) in Parquet
    files of several row groups read as the same records as JSONL, in a file or a folder of them."""
    import pyarrow
    import pyarrow.parquet

    records = json.loads((shared_data / "alpaca" / "alpaca_2k.json").read_text())
    chats = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"] or "-"}]}
             for r in records[:300]]  # fmt: skip
    for format, rows in (("alpaca", records), ("chat", chats)):
        jsonl = tmp_path / format / "data.jsonl"
        jsonl.parent.mkdir()
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        folder = tmp_path / format / "parquet"
        folder.mkdir()
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):  # two files, row groups of 64 rows
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(part), folder / f"train-{i:05d}-of-00002.parquet", row_group_size=64)
        want = store_files(section_of(jsonl, format, tmp_path / format / "c1"), gpt2_tokenizer)
        assert store_files(section_of(folder, format, tmp_path / format / "c2"), gpt2_tokenizer) == want
        one = read_source(SourceSection(format=format, path=str(folder / "train-00000-of-00002.parquet")), 0, "skip")
        assert len(one.records) + len(one.skipped) == half
        assert one.records[0]["origin"] == f"{folder / 'train-00000-of-00002.parquet'} row 1"


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_a_cut_compressed_file_is_one_line_naming_it(tmp_path, suffix):
    lines = "".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(20_000)).encode()
    path = tmp_path / f"cut.jsonl{suffix}"
    whole = compress(lines, suffix)
    path.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError) as raised:
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "skip")
    message = str(raised.value)
    assert message.startswith(f"{path}: the ") and "stream cannot be read to its end" in message and "\n" not in message
    assert "cut short or damaged" in message


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text('{"instruction": "hi", "output": "there"}\n')
    with pytest.raises(DataError, match=rf"^{path}: not a Parquet file that can be read \("):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "fail")
    compressed = tmp_path / "train.parquet.gz"
    compressed.write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataError, match="a Parquet file compresses its own columns"):
        read_source(SourceSection(format="alpaca", path=str(compressed)), 0, "fail")


def test_a_glob_pattern_reads_the_files_it_matches_and_their_changes_rebuild_the_store(tmp_path, shared_data, gpt2_tokenizer):
    """`path: data/train-*.jsonl` beside the recipe reads the train parts and not the test one
    (a hub download's layout), in name order: the store of the parts joined in one file."""
    from conftest import cli

    from gptj_tune.recipe import load_recipe

    records = json.loads((shared_data / "alpaca" / "alpaca_2k.json").read_text())[:600]
    data = tmp_path / "data" / "nested"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"train-{i:05d}-of-00003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[i * 200 : (i + 1) * 200]))
    (data / "test-00000-of-00001.jsonl").write_text(json.dumps({"instruction": "held", "output": "out"}) + "\n")
    joined = tmp_path / "joined.jsonl"
    joined.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  sources:\n    - format: alpaca\n      path: data/**/train-*.jsonl\n  on_bad_record: skip\n")
    source = load_recipe(recipe).data.sources[0]
    assert source.path == str(tmp_path / "data" / "**" / "train-*.jsonl")  # resolved beside the recipe
    section = section_of(source.path, "alpaca", tmp_path / "cache")
    assert store_files(section, gpt2_tokenizer) == store_files(section_of(joined, "alpaca", tmp_path / "cache-joined"), gpt2_tokenizer)
    assert not prepare_data(section, gpt2_tokenizer).built  # the same files: the same store
    with open(data / "train-00002-of-00003.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "one more", "output": "record"}) + "\n")
    assert prepare_data(section, gpt2_tokenizer).built  # a matched file changed: a new store
    recipe.write_text("data:\n  sources:\n    - format: alpaca\n      path: data/valid-*.jsonl\n")
    result = cli("validate", str(recipe))
    assert result.returncode == 2, result.stderr
    assert f"`data.sources.0.path` (line 4): the pattern {tmp_path / 'data' / 'valid-*.jsonl'} matches no files" in result.stderr


def test_a_book_that_changes_between_its_check_and_its_reading_is_one_line(tmp_path):
    """A .txt document is checked whole (UTF-8, not blank) when its record is made and read a part
    at a time later, while it is tokenized: written over in between, it is a DataError naming it,
    not a UnicodeDecodeError from deep in the build."""
    from gptj_tune.data.formats import SkipLog, iter_records

    book = tmp_path / "book.txt"
    book.write_text("Chapter 1\n\nIt was a bright cold day in April.\n")
    [record] = list(iter_records(SourceSection(format="text", path=str(book)), 0, "fail", SkipLog()))
    book.write_bytes(b"Chapter 1\n\nIt was \xff bright cold day.\n")  # another program writes to it
    with pytest.raises(DataError, match=rf"^{book}: the file changed while it was read \(UnicodeDecodeError: "):
        record["text"].read()


@pytest.mark.parametrize("name, delimiter, line_end, suffix", [("a.csv", ",", "\n", ""), ("a.tsv", "\t", "\r\n", ".gz")])
def test_csv_and_tsv_files_give_the_json_store(tmp_path, shared_data, gpt2_tokenizer, name, delimiter, line_end, suffix):
    """Alpaca as CSV (cells quoted where they hold commas, quotes or line ends) and as gzipped TSV
    with Windows line ends: the JSON file's store, byte for byte."""
    import csv
    import io

    alpaca = shared_data / "alpaca" / "alpaca_2k.json"
    records = json.loads(alpaca.read_text())
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=line_end)
    writer.writerow(["instruction", "input", "output"])
    writer.writerows([r["instruction"], r["input"], r["output"]] for r in records)
    path = tmp_path / "csv" / (name + suffix)
    path.parent.mkdir()
    path.write_bytes(compress(out.getvalue().encode(), suffix) if suffix else out.getvalue().encode())
    assert store_files(section_of(path, "alpaca", tmp_path / "c1"), gpt2_tokenizer) == \
        store_files(section_of(alpaca, "alpaca", tmp_path / "c2"), gpt2_tokenizer)  # fmt: skip


def test_a_bad_csv_row_or_a_legacy_encoding_is_named_by_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"A ""quoted""\ncell",fine\ntoo,many,cells\n')
    with pytest.raises(DataError, match=rf"^{path}:4: 3 cells where the header \({path}:1\) has 2 \(set data.on_bad_record: skip"):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "fail")
    read = read_source(SourceSection(format="alpaca", path=str(path)), 0, "skip")
    assert [(r["origin"], r["instruction"]) for r in read.records] == [(f"{path}:2", 'A "quoted"\ncell')]
    # a quote closed in the middle of a cell: csv's lenient mode read `unclosed,b\nNext."` as one cell
    path.write_text('instruction,output\n"unclosed,b\n"Next.",fine\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not CSV that can be read \(',' expected after '\"'\)"):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "skip")
    path.write_bytes("instruction,output\nCaf\u00e9,fine\n".encode("cp1252"))  # Excel's "CSV" on Windows
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 text \(byte 23 of the file is 0xe9\); save the file as UTF-8"):
        read_source(SourceSection(format="alpaca", path=str(path)), 0, "skip")


def test_deduplicate_keeps_the_first_copy_across_sources_and_no_held_out_record_is_trained_on(tmp_path, shared_data, gpt2_tokenizer):
    """Alpaca's 2k records in one source, 1,196 of them again (100 twice) beside 50 new ones in a
    second; two copies of a novel in a folder: each record and document is learned once."""
    alpaca = shared_data / "alpaca" / "alpaca_2k.json"
    records = [r for r in json.loads(alpaca.read_text()) if r["output"].strip()]  # (4 have no output: skipped either way)
    again = tmp_path / "again.jsonl"
    new = [{**r, "instruction": "Again: " + r["instruction"]} for r in records[:50]]
    again.write_text("".join(json.dumps(r) + "\n" for r in records[800:] + new + records[900:1000]))
    books = tmp_path / "books"
    books.mkdir()
    novel = shared_data / "domain" / "alice_in_wonderland_pg11.txt"
    for name in ("alice.txt", "alice-copy.txt"):
        (books / name).write_bytes(novel.read_bytes())
    sources = [SourceSection(format="alpaca", path=str(alpaca)), SourceSection(format="alpaca", path=str(again)),
               SourceSection(format="text", path=str(books))]  # fmt: skip
    section = DataSection(sources=sources, max_length=256, eval_fraction=0.1, on_bad_record="skip", deduplicate=True,
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data = prepare_data(section, gpt2_tokenizer)
    meta = data.store.meta["sources"]
    assert [s["duplicates"] for s in meta] == [0, 1296, 1] and data.duplicates == 1297
    assert [s["examples"] for s in meta] == [len(records), 50, meta[2]["examples"]] and meta[2]["examples"] > 0
    plain = prepare_data(section.model_copy(update={"deduplicate": False}), gpt2_tokenizer)
    assert plain.train_stats.examples + plain.eval_stats.examples > data.train_stats.examples + data.eval_stats.examples
    train = {tuple(row.input_ids.tolist()) for row in _examples(data.train_rows)}
    held = [tuple(row.input_ids.tolist()) for row in _examples(data.eval_rows)]
    assert held and not train & set(held)  # nothing held out is also trained on
    plain_train = {tuple(row.input_ids.tolist()) for row in _examples(plain.train_rows)}
    assert plain_train & {tuple(row.input_ids.tolist()) for row in _examples(plain.eval_rows)}  # as there was without it
    from conftest import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name_or_path: tiny-gptj\n  tokenizer: {shared_data / 'gpt2-tokenizer'}\ndata:\n  sources:\n"
                      f"    - {{format: alpaca, path: {alpaca}}}\n    - {{format: alpaca, path: {again}}}\n  max_length: 256\n"
                      f"  on_bad_record: skip\n  deduplicate: true\n  cache_dir: {tmp_path / 'cache'}\n")  # fmt: skip
    shown = cli("data", "prepare", str(recipe))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "│ 1,296 " in shown.stdout, shown.stdout  # the duplicates column


def _examples(rows):
    """Each packed example of `rows` as a row of its own (positions restart at 0 in each)."""
    from types import SimpleNamespace

    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids.tolist()) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:]):
            yield SimpleNamespace(input_ids=row.input_ids[a:b])
