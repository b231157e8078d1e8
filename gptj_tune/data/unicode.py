"""Text that no tokenizer takes: JSON may carry half of a UTF-16 surrogate pair ("\\ud800"), which
Python decodes into a string that cannot be encoded as UTF-8. Both record readers (the field
formats and chat messages) refuse it with the same words."""

from __future__ import annotations

import re

_HALF_SURROGATE = re.compile("[\ud800-\udfff]")


def half_surrogate(value: str) -> str | None:
    """What is wrong with `value` (`holds '\\ud800' at character 3, ...`), or None when it is text.
    A search, not a copy: a field may be a document of gigabytes."""
    half = _HALF_SURROGATE.search(value)
    if half is None:
        return None
    return f"holds {half.group()!r} at character {half.start() + 1}, half of a UTF-16 surrogate pair and not text"
