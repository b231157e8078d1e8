"""Readers for the data formats: alpaca, dolly, text, jsonl (field mapping), synthetic.

Each reader yields plain records: `{"instruction", "input", "output", "origin"}` for instruction
data, `{"text", "origin"}` for raw text (a `.txt` file's text is a `TextFile`, read a part at a
time). `origin` is "file:line" so any later error can point at it.
Malformed records raise DataError naming file, line and field, or are skipped and counted.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError, typed_first_line
from ..hub import hub_reachable, unreachable_note
from ..recipe import SourceSection
from ..recipe.load import is_pattern, matches
from . import synthetic
from .chat import ChatFields, messages_of
from .chat_tools import tools_of
from .files import COMPRESSED, damaged, decompression_errors, is_compressed, kind_of, open_binary, parquet_rows
from .json_array import json_array_rows
from .unicode import NotUtf8, half_surrogate, utf8_blocks

# (record field, fields it may come from in the file), per instruction format.
FIELD_MAPS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
}


TEXT_PART_CHARS = 16 << 20  # a .txt document is read this many characters at a time
_CHECK_BYTES = 16 << 20  # and checked this many bytes at a time first


@dataclass(frozen=True)
class TextFile:
    """A `.txt` document (one record), read a part at a time as it is tokenized: a corpus file of
    gigabytes is never held whole (it was, about twice over while it was decoded). UTF-8 with the
    BOM stripped and line ends made `\n`, as checked beforehand by `_text_file_row`."""

    path: Path

    def parts(self) -> Iterator[str]:
        # \r\n and \r become \n, across parts too
        try:
            with io.TextIOWrapper(open_binary(self.path), encoding="utf-8-sig", newline=None) as f:
                while part := f.read(TEXT_PART_CHARS):
                    yield part
        except (UnicodeDecodeError, *decompression_errors()) as e:  # it was whole UTF-8 when checked
            raise DataError(f"{self.path}: the file changed while it was read ({typed_first_line(e)}); prepare the data "
                            f"again once nothing writes to it") from None  # fmt: skip

    def read(self) -> str:
        return "".join(self.parts())


@dataclass
class SourceRecords:
    records: list[dict]
    skipped: list[str] = field(default_factory=list)  # one message per skipped record


@dataclass
class SkipLog:
    """Records skipped (on_bad_record: skip): how many, and the first messages, for the report."""

    count: int = 0
    messages: list[str] = field(default_factory=list)
    keep: int = 1000
    last: str = ""

    def add(self, message: str) -> None:
        self.count += 1
        self.last = message
        if len(self.messages) < self.keep:
            self.messages.append(message)


def read_source(source: SourceSection, index: int, on_bad_record: str) -> SourceRecords:
    """Every record of one `data.sources[index]` entry, in a list (`iter_records` streams them)."""
    log = SkipLog(keep=10**9)
    records = [{**r, "text": r["text"].read()} if isinstance(r.get("text"), TextFile) else r
               for r in iter_records(source, index, on_bad_record, log)]  # fmt: skip
    return SourceRecords(records, log.messages)


def iter_records(source: SourceSection, index: int, on_bad_record: str, skipped: SkipLog) -> Iterator[dict]:
    """The records of one `data.sources[index]` entry, one at a time (a corpus larger than memory
    streams through); a skipped record is counted in `skipped`."""
    key = f"data.sources[{index}]"
    if source.format == "synthetic":
        records = synthetic.generate_records(source.count or 4000, tuple(source.tasks or synthetic.TASKS), source.seed)
        if source.as_chat:
            records = synthetic.as_conversations(records)
        for i, r in enumerate(records):
            r["origin"] = f"synthetic:{i + 1}"
        yield from records
        return
    count = 0
    fields = ChatFields.of(source, key)
    for origin, raw in _raw_rows(source, key):
        try:
            record = _to_record(source, raw, origin, fields)
        except DataError as e:
            if on_bad_record == "fail":
                raise DataError(f"{e} (set data.on_bad_record: skip to skip such records)") from None
            skipped.add(str(e))
            continue
        yield record
        count += 1
        if source.limit and count >= source.limit:
            break
    if not count:
        raise DataError(f"{key}: no usable records in {source.path} ({skipped.count} skipped)")


def _to_record(source: SourceSection, raw, origin: str, fields: ChatFields) -> dict:
    if isinstance(raw, _Malformed):
        raise DataError(raw.message)
    if not isinstance(raw, dict):
        raise DataError(f"{origin}: expected a JSON object, got {type(raw).__name__}")
    if source.format == "text":
        text = raw.get(source.text_field)
        return {"text": text if isinstance(text, TextFile) else _field(raw, source.text_field, origin, allow_empty=False),
                "origin": origin}  # fmt: skip
    if source.format == "chat":
        messages, tools = messages_of(raw, origin, fields), tools_of(raw, origin)
        return {"messages": messages, "origin": origin, **({"tools": tools} if tools else {})}
    if source.format == "jsonl":
        mapping = {"instruction": source.prompt_field, "input": source.input_field, "output": source.response_field}
    else:
        mapping = FIELD_MAPS[source.format]
    record = {"origin": origin}
    for name, file_field in mapping.items():
        optional = name == "input"
        if file_field is None or (optional and file_field not in raw):
            record[name] = ""
            continue
        record[name] = _field(raw, file_field, origin, allow_empty=optional)
    if source.format == "dolly" and "category" in raw:
        record["category"] = raw["category"]
    return record


def _field(raw: dict, name: str, origin: str, allow_empty: bool) -> str:
    if name not in raw:
        raise DataError(f"{origin}: missing field `{name}` (fields present: {', '.join(raw) or 'none'})")
    value = raw[name]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{origin}: field `{name}` must be a string, got {type(value).__name__}")
    if (wrong := half_surrogate(value)) is not None:
        raise DataError(f"{origin}: field `{name}` {wrong}")
    if not allow_empty and (not value or value.isspace()):  # (no copy of a document of gigabytes)
        raise DataError(f"{origin}: field `{name}` is empty")
    return value


def _raw_rows(source: SourceSection, key: str) -> Iterator[tuple[str, object]]:
    path = Path(source.path)
    if source.subset is not None and (is_pattern(source.path) or path.exists()):
        raise DataError(f"{key}.subset: {source.path} is local files, read as they are; `subset` picks a hub dataset's "
                        f"configuration: remove it, or point `path` at that subset's files")  # fmt: skip
    if is_pattern(source.path):
        files = matches(source.path)
        if not files:
            raise DataError(f"{key}.path: the pattern {source.path} matches no files")
    elif path.is_dir():
        suffixes = ({".txt"} if source.format == "text" else {".json"}) | {".jsonl", ".parquet", ".csv", ".tsv"}
        files = sorted(p for p in path.rglob("*") if kind_of(p) in suffixes and p.is_file())
        if not files:
            raise DataError(f"{key}: folder {path} has no {', '.join(sorted(suffixes))} files (compressed ones too: "
                            f"{', '.join(COMPRESSED)})")  # fmt: skip
    elif path.is_file():
        files = [path]
    else:
        yield from _hub_rows(source, key)
        return
    for file in files:
        try:
            yield from _file_rows(file, source.text_field)
        except decompression_errors() as e:
            if not is_compressed(file):
                raise
            raise damaged(file, e) from None


def _file_rows(file: Path, text_field: str) -> Iterator[tuple[str, object]]:
    kind = kind_of(file)
    if kind == ".parquet":
        if is_compressed(file):
            raise DataError(f"{file}: a Parquet file compresses its own columns; decompress it and point the source at "
                            f"the .parquet file")  # fmt: skip
        yield from parquet_rows(file)
    elif kind == ".txt":
        yield _text_file_row(file, text_field)
    elif kind in (".csv", ".tsv"):
        yield from _csv_rows(file, "\t" if kind == ".tsv" else ",")
    elif kind == ".jsonl" or _starts_with(file) != "[":
        yield from _jsonl_rows(file)
    else:
        yield from json_array_rows(file)


def _csv_rows(file: Path, delimiter: str) -> Iterator[tuple[str, object]]:
    """Each row of a CSV (TSV) file with a header row, as {column: text}, a block at a time (quoted
    cells may span lines); a row with more or fewer cells than the header is a malformed record.
    Not UTF-8 (a spreadsheet's legacy export) is one error naming line and byte."""
    import csv

    def lines() -> Iterator[str]:
        rest = ""
        for text in utf8_blocks(f, _CHECK_BYTES):
            *whole, rest = (rest + text).split("\n")
            yield from (line + "\n" for line in whole)
        if rest:
            yield rest

    csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document (the default stops at 128 KB)
    with open_binary(file) as f:
        reader = csv.reader(lines(), delimiter=delimiter, strict=True)  # `"a"b`: an error, not the cell `a"b`
        try:
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for row in reader:
                origin, start = f"{file}:{start}", reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield origin, _Malformed(f"{origin}: {len(row)} cells where the header ({file}:1) has {len(header)}")
                    continue
                yield origin, dict(zip(header, row))
        except NotUtf8 as e:
            raise DataError(f"{file}:{e.line}: {e}; save the file as UTF-8 (a spreadsheet's \"CSV UTF-8\")") from None
        except csv.Error as e:
            raise DataError(f"{file}:{reader.line_num}: not CSV that can be read ({e})") from None


def _text_file_row(file: Path, text_field: str) -> tuple[str, object]:
    """A .txt file's one record: its TextFile, once a pass over the file found UTF-8 that is not all
    blank; otherwise what is wrong (a malformed record naming the line, or an empty field)."""
    blank = True
    try:
        with open_binary(file) as f:
            for text in utf8_blocks(f, _CHECK_BYTES):
                blank = blank and text.isspace()
    except NotUtf8 as e:
        return f"{file}:{e.line}", _Malformed(f"{file}:{e.line}: {e}; the document is one record")
    return f"{file}:1", {text_field: "" if blank else TextFile(file)}


def _starts_with(file: Path) -> str:
    with open_binary(file) as f:
        return f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()[:1].decode("ascii", errors="replace")


def _jsonl_rows(file: Path) -> Iterator[tuple[str, object]]:
    """Each line's JSON value; a line that is not UTF-8 or not JSON is a malformed record of its own
    (named by file and line, skipped with on_bad_record: skip), not the end of the file."""
    with open_binary(file) as f:
        for n, raw in enumerate(f, start=1):
            origin = f"{file}:{n}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                yield origin, _Malformed(f"{origin}: not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start]:#04x})")
                continue
            if not line.strip():
                continue
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, _Malformed(f"{origin}: not valid JSON ({e.msg} at column {e.colno})")
            except ValueError as e:  # an integer of more than 4300 digits
                yield origin, _Malformed(f"{origin}: a JSON value Python will not read ({str(e).split(':')[0]})")
            except RecursionError:
                yield origin, _Malformed(f"{origin}: JSON nested too deeply to read (thousands of levels)")


@dataclass
class _Malformed:
    """A JSONL line that did not parse; `_to_record` turns it into a DataError (or a skip)."""

    message: str


def _where_looked(path: str) -> str:
    """Where a relative path was looked for (recipe.load_recipe resolves one that exists)."""
    if Path(path).is_absolute():
        return ""
    return " (a relative path is looked for beside the recipe file, then in the current directory)"


def _hub_rows(source: SourceSection, key: str) -> Iterator[tuple[str, object]]:
    hub_reachable()  # no route to the hub: offline at once, not a minute of retries
    try:
        import datasets

        # Streaming: a hub dataset larger than memory (or the disk's free space) is read a shard at a time.
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        text = str(e)
        if "config" in text.lower() and ("missing" in text.lower() or "not found" in text.lower()):
            named = re.search(r"available(?: configs)?: (\[[^\]]*\])", text, re.IGNORECASE)
            what = f"has no subset {source.subset!r}" if source.subset else "has several subsets"
            raise DataError(f"{key}.subset: {source.path} {what} ({typed_first_line(e)}); set {key}.subset to "
                            f"{'one of ' + named.group(1) if named else 'one of its subsets'}") from None  # fmt: skip
        raise DataError(
            f"{key}.path: {source.path!r} is not a local file or folder{_where_looked(source.path)}, and loading it as a hub dataset "
            f"failed ({typed_first_line(e)}).{unreachable_note()} Check the path, or "
            f"download the dataset on a machine with network access and point `path` at the file."
        ) from None
    if first is None:
        return
    where = f"{source.path}[{source.subset + ', ' if source.subset else ''}{source.split}]"
    yield f"{where} row 1", dict(first)
    for n, row in enumerate(rows, start=2):
        yield f"{where} row {n}", dict(row)
