"""`gptj-tune generate`: stream a model's answer to prompts, with the prompt template it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.chat import ChatTemplateError
from .data.templates import Template, get_template
from .errors import DataError, GptjTuneError, ModelError, first_line


class Generator:
    """A loaded target (run dir: base + adapter or full; export folder; model name) ready to answer."""

    def __init__(self, target: str, raw: bool = False, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, system: str | None = None):  # fmt: skip
        from .evaluate.targets import load_target_model, resolve_target

        resolved = resolve_target(target)
        try:
            self.model, self.tokenizer = load_target_model(resolved, "cuda" if torch.cuda.is_available() else "cpu")
        except OSError as e:
            raise ModelError(f"cannot load {target} ({first_line(e)})") from None
        self.template = None if raw else _template_of(resolved.run_dir or Path(target))
        # A model trained on conversations: its tokenizer carries the chat template (saved with final/ and the export).
        self.chat_template = None if raw else getattr(self.tokenizer, "chat_template", None)
        if system is not None and not self.chat_template:
            why = "--raw drops its chat template" if raw else "it has no chat template (not trained on conversations)"
            raise GptjTuneError(f"--system: {target}: {why}, so there is no system turn to put it in")
        self.history: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.options = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            self.options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        self.seed = seed

    def prompt_text(self, prompt: str, input: str = "") -> str:
        if self.template is None:
            return prompt + (("\n" + input) if input else "")
        return self.template.render_prompt(prompt, input)

    @torch.no_grad()
    def answer(self, prompt: str, input: str = "", streamer=None) -> str:
        """The model's answer: stops at EOS and at the template's stop strings (cut from the text)."""
        torch.manual_seed(self.seed)
        ids = self.tokenizer(self.prompt_text(prompt, input), return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.model.device)
        stops = list(self.template.stop) if self.template else []
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
            stop_strings=stops or None, tokenizer=self.tokenizer if stops else None, **self.options,
        )  # fmt: skip
        text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return self.template.answer_in(text) if self.template else text.strip()

    @torch.no_grad()
    def chat_turn(self, message: str, streamer=None) -> str:
        """One turn of a conversation kept across calls: the history and this message rendered with
        the chat template and its generation prompt; the reply (up to EOS) joins the history."""
        from .data.chat import render

        torch.manual_seed(self.seed)
        self.history.append({"role": "user", "content": message})
        try:
            text = render(self.tokenizer, self.chat_template, self.history, add_generation_prompt=True)
        except DataError:
            self.history.pop()  # not said: the conversation goes on without it
            raise
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.model.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **self.options)  # fmt: skip
        reply = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def stream(self, prompt: str, console, input: str = "") -> str:
        from transformers import TextStreamer

        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.answer(prompt, input, streamer)


    def answer_file(self, path: Path, console) -> None:
        """Each non-empty line of `path` as a prompt of its own, echoed before its answer."""
        from rich.markup import escape

        for line in path.read_text().splitlines():
            if line.strip():
                console.print(f"[bold]> {escape(line)}[/]")
                self.stream(line, console)

    def chat_loop(self, console) -> None:
        """Lines typed until an empty one or Ctrl-D: one conversation when the model was trained on
        conversations (its chat template), else each line answered alone."""
        from rich.markup import escape
        from transformers import TextStreamer

        while True:
            try:
                line = console.input("[bold]> [/]")
            except EOFError:
                break
            if not line.strip():
                break
            if self.chat_template:
                try:
                    self.chat_turn(line, TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True))
                except ChatTemplateError as e:  # e.g. a template that refuses a system turn: say so, keep the conversation
                    console.print(f"[red]{escape(str(e))}[/]", soft_wrap=True)
            else:
                self.stream(line, console)


def _template_of(target: Path) -> Template | None:
    """The template a run was trained with (its recipe), or that an export recorded (gptj-tune.json)."""
    if (target / "recipe.yaml").is_file():
        from .recipe import load_recipe

        return get_template(load_recipe(target / "recipe.yaml").data.template)
    if (target / "gptj-tune.json").is_file():
        from .recipe import CustomTemplate

        spec = json.loads((target / "gptj-tune.json").read_text())["template"]
        return get_template(spec if isinstance(spec, str) else CustomTemplate(**spec))
    return None
