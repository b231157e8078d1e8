"""Data files as they come, beside JSON, JSONL, CSV/TSV and .txt (read in formats.py): compressed
(`.gz`, `.bz2`, `.xz`, `.zst`: The Pile, GPT-J's own corpus, ships as `.jsonl.zst`) and Parquet
(what the hub stores datasets as, so a `huggingface-cli download` of one is a folder of
`.parquet` files). Each is read as a stream: a compressed file is decompressed as it is read, a
Parquet file a row group's batch at a time, so neither is ever held whole in memory or written
out decompressed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import DataError, typed_first_line

COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
PARQUET_BATCH_ROWS = 1024


def kind_of(file: Path) -> str:
    """The data suffix under any compression suffix: `.jsonl` for `a.jsonl.zst`, `.txt` for `b.txt`."""
    name = file.name.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return Path(name[: -len(suffix)]).suffix
    return Path(name).suffix


def open_binary(file: Path) -> BinaryIO:
    """The file's bytes, decompressed as they are read where its name says it is compressed."""
    name = file.name.lower()
    if name.endswith(".gz"):
        return gzip.open(file, "rb")
    if name.endswith(".bz2"):
        return bz2.open(file, "rb")
    if name.endswith(".xz"):
        return lzma.open(file, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(file), buffer_size=1 << 20)
    return open(file, "rb")


class _ZstdReader(io.RawIOBase):
    """A .zst file's bytes, frame after frame (`zstd -B` and pzstd write a large file in several),
    and an error where the file ends inside a frame: zstandard's own stream reader ends there
    quietly, so a cut file would read as a shorter one."""

    def __init__(self, file: Path):
        import zstandard

        self._zstd = zstandard
        self._raw = open(file, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # bytes of a frame fed, its end not reached
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(1 << 18)
            if not chunk:
                if self._in_frame:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self._frame.decompress(chunk))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            chunk = self._frame.unused_data  # the next frame's first bytes
            self._frame = self._decompressor.decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def decompression_errors() -> tuple[type[BaseException], ...]:
    """What a cut or damaged compressed file raises while it is read."""
    errors: list[type[BaseException]] = [EOFError, lzma.LZMAError, OSError]  # gzip's and bz2's are OSErrors
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def damaged(file: Path, error: BaseException) -> DataError:
    """One line for a compressed file that cannot be read to its end."""
    kind = COMPRESSED.get("." + file.name.lower().rsplit(".", 1)[-1], "")
    return DataError(f"{file}: the {kind} stream cannot be read to its end ({typed_first_line(error)}): the file is cut short "
                     f"or damaged; download or compress it again")  # fmt: skip


def is_compressed(file: Path) -> bool:
    return any(file.name.lower().endswith(s) for s in COMPRESSED)


def parquet_rows(file: Path) -> Iterator[tuple[str, object]]:
    """Each row of a Parquet file as a dict, PARQUET_BATCH_ROWS at a time (nested lists of structs,
    a conversation's turns, become lists of dicts)."""
    import pyarrow
    import pyarrow.parquet

    try:
        reader = pyarrow.parquet.ParquetFile(file)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a Parquet file that can be read ({typed_first_line(e)})") from None
    n = 0
    try:
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield f"{file} row {n}", row
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{file}: row {n + 1} and on cannot be read ({typed_first_line(e)}): the file is cut short or damaged") from None
    finally:
        reader.close()
