"""The items of a JSON array file (Alpaca's own format, ShareGPT dumps), read a block at a time.

Such a file used to be read whole, and decoded whole, before its first item: a ShareGPT dump of
several GB took about twice its size in memory. Now a window of decoded text slides over the file:
each item is decoded with `json.JSONDecoder.raw_decode` as soon as it is whole in the window, and
the text before it is dropped. Each item comes with the line it starts on, and every error names
the file's own line (and byte, for one that is not UTF-8).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .files import open_binary
from .unicode import NotUtf8, utf8_blocks

BLOCK_BYTES = 8 << 20  # read at a time
_BETWEEN_ITEMS = re.compile(r"[ \t\r\n,]*")
_DECODER = json.JSONDecoder()


class _Window:
    """Decoded text of `file` from some point on, and where that point is (line, column)."""

    def __init__(self, file: Path):
        self.file, self.f = file, open_binary(file)
        self.blocks = utf8_blocks(self.f, BLOCK_BYTES)
        self.text, self.line, self.column = "", 1, 0  # the file's line and column of text[0]

    def more(self) -> bool:
        """Read and decode the next block onto the window; False at the end of the file."""
        try:
            decoded = next(self.blocks, None)
        except NotUtf8 as e:
            raise DataError(f"{self.file}:{e.line}: {e}; a JSON array is one unit, so this file cannot be read: fix or "
                            f"remove that byte") from None  # fmt: skip
        if decoded is None:
            return False
        self.text += decoded
        return True

    def drop_before(self, pos: int) -> None:
        """Forget the text before `pos` (keeping track of where the window starts)."""
        newlines = self.text.count("\n", 0, pos)
        self.column = pos - self.text.rfind("\n", 0, pos) - 1 if newlines else self.column + pos
        self.line += newlines
        self.text = self.text[pos:]

    def where(self, pos: int) -> tuple[int, int]:
        """The file's (line, column) of text[pos], both from 1."""
        newlines = self.text.count("\n", 0, pos)
        column = pos - self.text.rfind("\n", 0, pos) if newlines else self.column + pos + 1
        return self.line + newlines, column

    def close(self) -> None:
        self.f.close()


def json_array_rows(file: Path) -> Iterator[tuple[str, object]]:
    """Items of the JSON array in `file`, each as ("file:line", item), one at a time."""
    window = _Window(file)
    try:
        while "[" not in window.text:
            if not window.more():
                raise DataError(f"{file}: not a JSON array (no `[`)")
        pos = window.text.index("[") + 1
        line, counted_to = window.line + window.text.count("\n", 0, pos), pos  # the file's line of text[counted_to]
        while True:
            pos = _BETWEEN_ITEMS.match(window.text, pos).end()
            if pos >= len(window.text):
                if not window.more():
                    raise DataError(f"{file}: the JSON array is not closed with `]`")
                continue
            if window.text[pos] == "]":
                return
            line += window.text.count("\n", counted_to, pos)  # counted on from the last item: the window holds MBs
            counted_to = pos
            if pos > BLOCK_BYTES:  # the items before it are done: the window stays about a block long
                window.drop_before(pos)
                pos = counted_to = 0
            item, pos = _item_at(window, pos, line)
            yield f"{file}:{line}", item
    finally:
        window.close()


def _item_at(window: _Window, pos: int, line: int) -> tuple[object, int]:
    """The JSON value that starts at window.text[pos] and where it ends, once it is whole in the window."""
    while True:
        try:
            item, end = _DECODER.raw_decode(window.text, pos)
        except json.JSONDecodeError as e:
            cut_short = e.msg.startswith("Unterminated string") or e.pos >= len(window.text) - 6  # the window's end
            if cut_short and window.more():
                continue
            where, column = window.where(e.pos)
            raise DataError(f"{window.file}:{where}: not valid JSON ({e.msg} at column {column})") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise DataError(f"{window.file}:{line}: a JSON value Python will not read ({str(e).split(':')[0]})") from None
        except RecursionError:
            raise DataError(f"{window.file}:{line}: JSON nested too deeply to read (thousands of levels)") from None
        if not isinstance(item, (dict, list, str)) and end > len(window.text) - 32 and window.more():
            continue  # a number (1.5e|10) may go on in the next block
        return item, end
