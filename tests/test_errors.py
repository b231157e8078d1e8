"""errors.first_line: what one-line messages quote of a library's error."""

from __future__ import annotations

from gptj_tune.errors import first_line, typed_first_line


def test_the_first_line_of_a_long_message_or_the_type_of_an_empty_one():
    long = RuntimeError("\n  Error(s) in loading state_dict for GPTJForCausalLM:\n\tMissing key(s): lm_head.weight\n")
    assert first_line(long) == "Error(s) in loading state_dict for GPTJForCausalLM:"
    assert typed_first_line(long) == "RuntimeError: Error(s) in loading state_dict for GPTJForCausalLM:"
    # An error with no message (OSError(), a bare RuntimeError) once made `str(e).splitlines()[0]`
    # an IndexError traceback in place of the one-line message.
    assert first_line(OSError()) == "OSError" and typed_first_line(RuntimeError("  \n")) == "RuntimeError"
    assert first_line(KeyError("lm_head.weight")) == "'lm_head.weight'"
