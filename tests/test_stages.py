"""stages.py: a long stage ends with one line saying it and its time; a quick one (under
`quiet_below`) and a failed one print nothing."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gptj_tune.stages import stage_display, warner


def test_a_stage_prints_its_time_unless_quick_or_failed():
    out = io.StringIO()
    console = Console(file=out, width=40)
    with stage_display(console)("loaded EleutherAI/gpt-j-6b for qlora, a name longer than the console"):
        pass
    with stage_display(console)("wrote the weights"):
        pass
    with stage_display(console, quiet_below=60)("loaded tiny-gptj"):
        pass
    with pytest.raises(ValueError), stage_display(console)("merged"):
        raise ValueError("no")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("wrote the weights: 0.") and lines[1].endswith(" s"), lines
    assert lines[0].startswith("loaded EleutherAI/gpt-j-6b for qlora, a name longer than the console: ")  # never wrapped


def test_a_warning_is_one_line_with_its_text_as_written():
    out = io.StringIO()
    warner(Console(file=out, width=30))("mlflow failed: [Errno 2] no such file /runs/x/trackers/mlruns (dropped)")
    assert out.getvalue() == "warning: mlflow failed: [Errno 2] no such file /runs/x/trackers/mlruns (dropped)\n"
