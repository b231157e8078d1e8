"""Text that no tokenizer takes, found the same way by every reader.

- Bytes that are not UTF-8: `utf8_blocks` decodes a file a block at a time (a corpus file is never
  held whole) and names the line and byte of the first bad one (`NotUtf8`).
- Half of a UTF-16 surrogate pair: JSON may carry one ("\\ud800"), which Python decodes into a
  string that cannot be encoded as UTF-8. Both record readers (the field formats and chat
  messages) refuse it with the same words (`half_surrogate`).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from typing import BinaryIO

_HALF_SURROGATE = re.compile("[\ud800-\udfff]")
BOM = b"\xef\xbb\xbf"


class NotUtf8(ValueError):
    """A byte that is not UTF-8: its line and place in the file (both from 1) and its value."""

    def __init__(self, line: int, byte: int, value: int):
        super().__init__(f"not UTF-8 text (byte {byte} of the file is {value:#04x})")  # the caller names file and line
        self.line, self.byte, self.value = line, byte, value


def utf8_blocks(f: BinaryIO, block_bytes: int) -> Iterator[str]:
    """The text of the binary file `f`, decoded `block_bytes` at a time, a leading BOM dropped (a
    character cut between two blocks comes whole with the second); NotUtf8 at the first bad byte."""
    decoder, done, newlines = codecs.getincrementaldecoder("utf-8")(), 0, 0  # strict
    while True:
        block = f.read(block_bytes)
        end = not block
        if done == 0 and block.startswith(BOM):
            block, done = block[len(BOM) :], len(BOM)
        try:
            text = decoder.decode(block, final=end)
        except UnicodeDecodeError as e:  # e.object: the bytes held over from the last block, then this one
            at = done - (len(e.object) - len(block)) + e.start
            raise NotUtf8(newlines + e.object.count(b"\n", 0, e.start) + 1, at + 1, e.object[e.start]) from None
        done += len(block)
        newlines += text.count("\n")
        if text:
            yield text
        if end:
            return


def half_surrogate(value: str) -> str | None:
    """What is wrong with `value` (`holds '\\ud800' at character 3, ...`), or None when it is text.
    A search, not a copy: a field may be a document of gigabytes."""
    half = _HALF_SURROGATE.search(value)
    if half is None:
        return None
    return f"holds {half.group()!r} at character {half.start() + 1}, half of a UTF-16 surrogate pair and not text"
