"""Prompt templates: turn an instruction record into (prompt, response) text.

The prompt and the response are kept apart so the tokenizer sees them separately and the first
response token is known exactly; that is what lets prompt tokens get label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import CustomTemplate

_ALPACA_INTRO_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_ALPACA_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
_DOLLY_INTRO = _ALPACA_INTRO


@dataclass(frozen=True)
class Template:
    prompt: str
    prompt_with_input: str
    response_suffix: str = ""
    # Strings after which generation should stop (besides EOS).
    stop: tuple[str, ...] = ()

    def render_prompt(self, instruction: str, input: str = "") -> str:
        if input.strip():
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt.format(instruction=instruction)

    def render_response(self, response: str) -> str:
        return response + self.response_suffix

    def answer_in(self, generated: str) -> str:
        """The answer in a model's generated text: up to the first stop string, stripped."""
        for stop in self.stop:
            generated = generated.split(stop)[0]
        return generated.strip()


BUILTIN_TEMPLATES = {
    # Stanford Alpaca's two prompts.
    "alpaca": Template(
        prompt=_ALPACA_INTRO + "### Instruction:\n{instruction}\n\n### Response:\n",
        prompt_with_input=_ALPACA_INTRO_INPUT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
    # Databricks Dolly's prompt: context under "Input:", responses closed by "### End".
    "dolly": Template(
        prompt=_DOLLY_INTRO + "### Instruction:\n{instruction}\n\n### Response:\n",
        prompt_with_input=_DOLLY_INTRO + "### Instruction:\n{instruction}\n\nInput:\n{input}\n\n### Response:\n",
        response_suffix="\n\n### End",
        stop=("### End",),
    ),
    "plain": Template(prompt="{instruction}\n", prompt_with_input="{instruction}\n{input}\n"),
}


def get_template(spec: str | CustomTemplate) -> Template:
    """The Template for a recipe's `data.template` value (a built-in name or a custom section)."""
    if isinstance(spec, str):
        return BUILTIN_TEMPLATES[spec]
    suffix = spec.response_suffix
    return Template(
        prompt=spec.prompt,
        # Without its own with-input prompt, the input goes on the line after the instruction.
        prompt_with_input=spec.prompt_with_input or spec.prompt.replace("{instruction}", "{instruction}\n{input}", 1),
        response_suffix=suffix,
        stop=(suffix.strip(),) if suffix.strip() else (),
    )
