"""`gptj-tune generate`: stream a model's answer to prompts, with the prompt template it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.chat import ChatTemplateError
from .data.templates import Template, get_template
from .errors import DataError, GptjTuneError, ModelError, first_line


TOOL_RESULT = "/tool "  # a chat line that gives a tool's result, not the user's words


class Generator:
    """A loaded target (run dir: base + adapter or full; export folder; model name) ready to answer."""

    def __init__(self, target: str, raw: bool = False, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, system: str | None = None,
                 tools: list[dict] | None = None):  # fmt: skip
        from .evaluate.targets import load_target_model, resolve_target

        resolved = resolve_target(target)
        try:
            self.model, self.tokenizer = load_target_model(resolved, "cuda" if torch.cuda.is_available() else "cpu")
        except OSError as e:
            raise ModelError(f"cannot load {target} ({first_line(e)})") from None
        self.template = None if raw else _template_of(resolved.run_dir or Path(target))
        # A model trained on conversations: its tokenizer carries the chat template (saved with final/ and the export).
        self.chat_template = None if raw else getattr(self.tokenizer, "chat_template", None)
        for option, given, what in (("--system", system, "no system turn to put it in"), ("--tools", tools, "nowhere to offer them")):
            if given is not None and not self.chat_template:
                why = "--raw drops its chat template" if raw else "it has no chat template (not trained on conversations)"
                raise GptjTuneError(f"{option}: {target}: {why}, so there is {what}")
        self.history: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.tools = tools
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
    def chat_turn(self, message: str, streamer=None, role: str = "user") -> str:
        """One turn of a conversation kept across calls: the history and this message (the user's, or
        a tool's result with role `tool`) rendered with the chat template, its tools and its
        generation prompt; the reply (up to EOS) joins the history. A reply that calls tools joins
        it as the text the model wrote, which is how `gptj-chat` renders the calls again."""
        from .data.chat import render

        torch.manual_seed(self.seed)
        self.history.append({"role": role, "content": message})
        try:
            text = render(self.tokenizer, self.chat_template, self.history, add_generation_prompt=True, tools=self.tools)
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
                result = line.startswith(TOOL_RESULT)  # `/tool 3 C`: the result of the call the model made
                try:
                    reply = self.chat_turn(line[len(TOOL_RESULT) :].strip() if result else line,
                                           TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True), "tool" if result else "user")  # fmt: skip
                    if self.tools and "<tool_call>" in reply:  # gptj-chat's calls (and Hermes-style templates')
                        console.print(f"[dim](a tool call: give its result as {TOOL_RESULT.strip()} RESULT)[/]")
                except ChatTemplateError as e:  # e.g. a template that refuses a system turn: say so, keep the conversation
                    console.print(f"[red]{escape(str(e))}[/]", soft_wrap=True)
            else:
                self.stream(line, console)


def checked_options(prompt: str | None, file: str | None, chat: bool, system: str | None, tools: str | None) -> list[dict] | None:
    """`generate`'s options checked before a model is loaded, and the tools `--tools` offers."""
    if sum(x is not None and x is not False for x in (prompt, file, chat or None)) != 1:
        raise GptjTuneError("give exactly one of --prompt, --file or --chat")
    if file is not None and not Path(file).is_file():
        raise GptjTuneError(f"--file {file}: not found")
    for option, given, what in (("--system", system, "the system prompt"), ("--tools", tools, "the tools")):
        if given is not None and not chat:
            raise GptjTuneError(f"{option} is {what} of a --chat conversation; add --chat")
    if tools is None:
        return None
    from .data.chat_tools import tools_of

    try:
        offered = json.loads(Path(tools).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptjTuneError(f"--tools {tools}: not a readable JSON file ({first_line(e)}); give a JSON list of function "
                            "schemas ({name, description, parameters})") from None  # fmt: skip
    found = tools_of({"tools": offered}, f"--tools {tools}")
    if found is None:
        raise GptjTuneError(f"--tools {tools}: the list is empty; give at least one function schema")
    return found


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
