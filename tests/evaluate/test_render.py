"""The evaluation report's Markdown: sample answers holding pipes, backslashes and newlines stay one
table row of four cells each."""

from __future__ import annotations

import re

from gptj_tune.evaluate.render import report_markdown

# A GitHub-flavoured Markdown table row splits at every pipe that is not backslash-escaped, where
# a backslash escapes the one character after it.
CELL = re.compile(r"(?:\\.|[^|\\])+")


def _cells(row: str) -> list[str]:
    return [c.strip() for c in CELL.findall(row.strip().removeprefix("|").removesuffix("|"))]


def test_sample_answers_with_pipes_backslashes_and_newlines_stay_one_row_each():
    samples = [
        {"instruction": "### User: last word?\n### Assistant: king<|endoftext|>", "input": "", "reference": "a|b",
         "output": "x \\| y\nz", "correct": False},
        {"instruction": "Q" * 200 + "|", "input": "in|put", "reference": "C:\\dir\\", "output": "|", "correct": True},
    ]  # fmt: skip
    report = {"target": {"label": "runs/x"}, "benchmarks": {}, "held_out": {"loss": 1.0, "samples": samples}}
    md = report_markdown(report)
    header = md.index("| prompt | reference | output | ok |")
    rows = md[header:].splitlines()[2:4]
    assert [len(_cells(r)) for r in rows] == [4, 4], rows
    first, second = (_cells(r) for r in rows)
    unescape = lambda c: re.sub(r"\\(.)", r"\1", c)  # noqa: E731
    assert unescape(first[0]) == "### User: last word? ### Assistant: king<|endoftext|>"
    assert [unescape(c) for c in first[1:]] == ["a|b", "x \\| y z", "no"]
    assert unescape(second[0]) == "Q" * 120 and [unescape(c) for c in second[1:]] == ["C:\\dir\\", "|", "yes"]


def test_a_held_out_conversation_shows_the_end_of_its_prompt():
    """A conversation's prompt opens with its tools and system turn; the turn being answered ends it."""
    prompt = "### Tools:\n" + '{"name": "get_weather"} ' * 20 + "\n\n### User:\nWeather in Oslo?\n\n### Assistant:\n"
    samples = [{"instruction": prompt, "input": "", "reference": "3 C", "output": "3 C", "correct": True, "conversation": True},
               {"instruction": prompt, "input": "", "reference": "3 C", "output": "3 C", "correct": True}]  # fmt: skip
    md = report_markdown({"target": {"label": "runs/x"}, "benchmarks": {}, "held_out": {"loss": 1.0, "samples": samples}})
    conversation, instruction = (_cells(r)[0] for r in md[md.index("| prompt |") :].splitlines()[2:4])
    assert conversation.startswith("…") and conversation.endswith("### User: Weather in Oslo?  ### Assistant:")
    assert len(conversation) <= 120 and instruction.startswith("### Tools:")  # (the cell is stripped)
