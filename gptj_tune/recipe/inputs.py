"""Recipe sections for what is trained on what: `model`, `method` (full, LoRA, prompt tuning) and `data`."""

from __future__ import annotations

import string
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from .base import TINY_MODEL_NAME, Section


# --------------------------------------------------------------------------------------- model


class TinyModelSection(Section):
    layers: int = Field(4, ge=1, le=256, description="Transformer blocks of the built-in tiny GPT-J.")
    width: int = Field(128, ge=8, le=16384, description="Hidden size (d_model) of the tiny GPT-J.")
    heads: int = Field(4, ge=1, le=256, description="Attention heads; must divide `width`.")
    rotary_dim: int = Field(16, ge=2, le=4096, description="Rotary dimensions per head (GPT-J-6B uses 64 of 256).")
    vocab_size: int = Field(
        512,
        ge=260,
        le=1 << 20,
        description="Size of the byte-level BPE our code trains on the demo data. Ignored when "
        "`model.tokenizer` names a tokenizer; the embedding then has GPT-J's padded size.",
    )
    context: int = Field(512, ge=16, le=1 << 20, description="Maximum positions (n_positions).")
    init_std: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Std of the seeded normal init. Larger than GPT-J's 0.02 so that a LoRA on a frozen "
        "random head can still express confident predictions.",
    )
    seed: int = Field(0, description="Seed of the weight init: the same seed builds the same model.")

    @model_validator(mode="after")
    def _check_shapes(self):
        if self.width % self.heads:
            raise ValueError(f"model.tiny.width ({self.width}) must be divisible by model.tiny.heads ({self.heads})")
        head_dim = self.width // self.heads
        if self.rotary_dim > head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"model.tiny.rotary_dim ({self.rotary_dim}) must be even and at most the head size "
                f"width/heads = {head_dim}"
            )
        return self


class ModelSection(Section):
    name_or_path: str = Field(
        TINY_MODEL_NAME,
        description=f"Hub id (e.g. `EleutherAI/gpt-j-6b`) or local directory, loaded with `from_pretrained`; "
        f"`{TINY_MODEL_NAME}` builds the small built-in GPT-J offline.",
    )
    revision: str | None = Field(None, description="Hub revision, e.g. `float16` for GPT-J-6B's half-precision branch.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id or directory; defaults to `name_or_path`. With `tiny-gptj`, setting it "
        "builds the tiny model around that tokenizer instead of training one.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = Field(
        "float32",
        description="Weight dtype. On a CPU keep float32 weights (16-bit weights there lose precision in every "
        "update); for bf16 speed on CPUs with AMX or AVX-512 bf16 use distributed.mixed_precision: bf16.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. `sdpa`: torch's fused attention (gptj-tune's own for GPT-J, which "
        "transformers lacks, and on a GPU packed rows in one call of torch's variable-length FlashAttention; "
        "transformers' for models that have it). `eager`: transformers' reference. `flash_attention_2`: the "
        "flash-attn package (GPU): for GPT-J gptj-tune's attention with flash-attn's variable-length kernel; for "
        "other models transformers', which mixes packed examples, so it needs data.packing: false. "
        "`auto`: sdpa where the model has it, else eager.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run. Off unless set.")
    tiny: TinyModelSection = Field(default_factory=TinyModelSection, description="Shape of the built-in tiny GPT-J.")

    @field_validator("tiny", mode="before")
    @classmethod
    def _null_tiny_is_the_default(cls, value):
        # `--set model.tiny=null` drops a recipe's tiny shape when the command line names another model
        return {} if value is None else value

    @model_validator(mode="after")
    def _tiny_only_for_tiny(self):
        # (a tiny section equal to the defaults changes nothing: frozen recipes of earlier versions held one)
        if "tiny" in self.model_fields_set and self.name_or_path != TINY_MODEL_NAME and self.tiny != TinyModelSection():
            raise ValueError(
                f"model.tiny only shapes the built-in `{TINY_MODEL_NAME}`, but model.name_or_path is "
                f"{self.name_or_path!r}; remove model.tiny (on the command line: --set model.tiny=null) or set "
                f"name_or_path: {TINY_MODEL_NAME}"
            )
        return self

    @property
    def weights_in_16_bits(self) -> bool:
        return self.dtype in ("bfloat16", "bf16", "float16", "fp16")


# -------------------------------------------------------------------------------------- method


class FullMethod(Section):
    kind: Literal["full"] = Field(description="Train every weight.")


class LoraMethod(Section):
    kind: Literal["lora"] = Field(description="Low-rank adapters (peft) on frozen base weights.")
    r: int = Field(16, ge=1, le=16384, description="Adapter rank.")
    alpha: float = Field(32, gt=0, le=1e6, description="Scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt. Default for GPT-J: q_proj, k_proj, v_proj, out_proj, fc_in, fc_out "
        "(GPT-Neo: q_proj, k_proj, v_proj, out_proj, c_fc, c_proj). `all-linear`: every linear layer but the head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapters (e.g. `lm_head`)."
    )


class QLoraMethod(LoraMethod):
    """LoRA on a base whose block weights are held in 4 bits (bitsandbytes), as QLoRA does.

    A method of its own, not a `quantize:` setting on `lora` or on the model: a 4-bit base only
    serves adapters (nothing can train 4-bit weights, and a soft prompt gains little from it), so
    one key says it all, as axolotl's `adapter: qlora` does, and no recipe can ask for full
    fine-tuning of a quantized model."""

    kind: Literal["qlora"] = Field(
        description="LoRA adapters on a base whose linear layers are held in 4 bits (bitsandbytes NF4/FP4)."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit format of the base's linear weights: nf4 (NormalFloat, QLoRA's) or fp4."
    )
    double_quant: bool = Field(
        True, description="Quantize the per-block scales too (QLoRA's double quantization): ~0.37 bits a weight saved."
    )


class PromptTuningMethod(Section):
    kind: Literal["prompt_tuning"] = Field(
        description="A soft prompt: learned input vectors placed before every example, on a frozen model."
    )
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Length of the soft prompt, in token positions.")
    init_text: str | None = Field(
        None,
        description="Start the prompt from this text's token embeddings (repeated to fill the length); null: from "
        "the embeddings of vocabulary tokens drawn at random (seeded by train.seed).",
    )


Method = Annotated[Union[FullMethod, LoraMethod, QLoraMethod, PromptTuningMethod], Field(discriminator="kind")]
METHOD_TYPES = {"full": FullMethod, "lora": LoraMethod, "qlora": QLoraMethod, "prompt_tuning": PromptTuningMethod}


# ---------------------------------------------------------------------------------------- data


class SourceSection(Section):
    format: Literal["alpaca", "dolly", "text", "jsonl", "chat", "synthetic"] = Field(
        description="alpaca: instruction/input/output (JSON array or JSONL). dolly: instruction/context/"
        "response/category. text: .txt files or JSONL `text_field`, documents joined with EOS and cut into "
        "blocks. jsonl: any JSONL with `prompt_field`/`response_field`. chat: conversations, `messages` "
        "[{role, content}] or ShareGPT `conversations` [{from, value}], rendered with data.chat_template. "
        "synthetic: our generated demo tasks."
    )
    path: str | None = Field(
        None,
        description="Local file or folder, a glob pattern of files (`data/train-*.parquet`; `**` crosses folders), or a "
        "hub dataset id (e.g. `tatsu-lab/alpaca`) loaded with `datasets`. Files may be JSON, JSONL, CSV/TSV, .txt or Parquet, "
        "and compressed (.gz, .bz2, .xz, .zst). Relative paths are relative to the recipe file. Not used by `synthetic`.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(
        None, min_length=1, description="Hub dataset: its configuration (subset), e.g. `en` for `allenai/c4` "
        "(datasets.load_dataset's `name`); null: the dataset's only or default one.",
    )
    weight: float = Field(1.0, gt=0, le=1000, description="Sampling weight in the training mix: 2 repeats the source, 0.5 halves it.")
    limit: int | None = Field(None, ge=1, description="Read only the first N records.")
    prompt_field: str | None = Field(None, description="jsonl: field holding the prompt (instruction).")
    input_field: str | None = Field(None, description="jsonl: optional field holding extra input/context.")
    response_field: str | None = Field(None, description="jsonl: field holding the response.")
    text_field: str = Field("text", description="text: field of a JSONL file holding the document.")
    count: int | None = Field(None, ge=10, le=100_000_000, description="synthetic: number of records to generate (default 4000).")
    tasks: list[str] | None = Field(
        None, description="synthetic: tasks to generate (reverse, sort, upper, count, last); default all."
    )
    seed: int = Field(0, description="synthetic: generation seed.")
    as_chat: bool = Field(False, description="synthetic: the tasks as two-turn conversations (the chat demo).")
    messages_field: str | None = Field(
        None, min_length=1, description="chat: the field holding a record's turns (lmsys-chat's `conversation`, say); "
        "null: `messages`, else ShareGPT's `conversations`.",
    )
    role_field: str | None = Field(
        None, min_length=1, description="chat: a turn's role key; null: `from` in a `conversations` field, else `role`."
    )
    content_field: str | None = Field(
        None, min_length=1, description="chat: a turn's text key; null: `value` in a `conversations` field, else `content`."
    )
    roles: dict[Literal["system", "user", "assistant", "tool"], list[str]] | None = Field(
        None, description="chat: your data's role names for system, user, assistant and tool (a tool's result), beside "
        "the built-in ones (system; user, human; assistant, gpt, bot, model; tool, function, observation, ipython; "
        "ShareGPT's function_call is the assistant's calls as JSON), matched ignoring case, e.g. `{user: [prompter], "
        "assistant: [bot_reply]}` (axolotl's `roles`). A name you give wins over a built-in one.",
    )

    @property
    def is_chat(self) -> bool:
        return self.format == "chat" or self.as_chat

    @model_validator(mode="after")
    def _check_format_fields(self):
        problems = []
        if self.format == "synthetic":
            if self.path is not None:
                problems.append("`path` is not used with format synthetic; remove it")
            if self.subset is not None:
                problems.append("`subset` is not used with format synthetic (it picks a hub dataset's configuration); remove it")
        elif self.path is None:
            problems.append(f"`path` is required for format {self.format}: a local file/folder or a hub dataset id")
        if self.format != "synthetic":
            problems += [f"`{k}` only applies to format synthetic" for k in ("count", "tasks") if getattr(self, k) is not None]
            if self.as_chat:
                problems.append("`as_chat` only applies to format synthetic (format chat is already conversations)")
        if self.format != "chat":
            problems += [f"`{k}` only applies to format chat" for k in CHAT_KEYS if getattr(self, k) is not None]
        problems += self._roles_problems()
        if self.format == "jsonl":
            problems += [f"format jsonl needs `{k}`" for k in ("prompt_field", "response_field") if getattr(self, k) is None]
        else:
            problems += [
                f"`{k}` only applies to format jsonl"
                for k in ("prompt_field", "input_field", "response_field")
                if getattr(self, k) is not None
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("roles", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value):
        """`roles: {user: prompter}` is `{user: [prompter]}`."""
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    def _roles_problems(self) -> list[str]:
        seen: dict[str, str] = {}
        problems = []
        for role, names in (self.roles or {}).items():
            if not names:
                problems.append(f"`roles.{role}` is empty; give it at least one name or remove it")
            for name in names:
                if not name.strip():
                    problems.append(f"`roles.{role}` holds an empty name")
                elif name.lower() in seen and seen[name.lower()] != role:
                    problems.append(f"`roles`: {name!r} is named for both {seen[name.lower()]} and {role}; keep one")
                seen[name.lower()] = role
        return problems


CHAT_KEYS = ("messages_field", "role_field", "content_field", "roles")


class CustomTemplate(Section):
    prompt: str = Field(description="Prompt text with `{instruction}`; the response follows it directly.")
    prompt_with_input: str | None = Field(
        None, description="Prompt used when a record has input, with `{instruction}` and `{input}`."
    )
    response_suffix: str = Field("", description="Text appended after the response, before EOS (e.g. `\\n\\n### End`).")

    @model_validator(mode="after")
    def _check_placeholders(self):
        for key, text, allowed in (
            ("prompt", self.prompt, {"instruction"}),
            ("prompt_with_input", self.prompt_with_input, {"instruction", "input"}),
        ):
            if text is None:
                continue
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as e:
                raise ValueError(f"data.template.{key} is not a valid template ({e}); write literal braces as {{{{ }}}}")
            if names - allowed or "instruction" not in names:
                raise ValueError(
                    f"data.template.{key} may use only {sorted(allowed)} placeholders and must use {{instruction}}; "
                    f"found {sorted(names)}"
                )
        return self


class DataSection(Section):
    sources: list[SourceSection] = Field(
        default_factory=lambda: [SourceSection(format="synthetic")],
        min_length=1,
        description="Datasets to mix. Each item: format, path and options.",
    )
    template: Literal["alpaca", "dolly", "plain"] | CustomTemplate = Field(
        "alpaca", description="Prompt template: alpaca, dolly, plain, or {prompt, prompt_with_input, response_suffix}."
    )
    max_length: int = Field(512, ge=8, le=1 << 20, description="Tokens per training sequence (and per packed block).")
    packing: bool = Field(
        True,
        description="Pack several examples into each max_length row; positions restart per example and no token "
        "attends across an example boundary. false: one example per row, padded.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_length (the count is printed)."
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (chat: on every turn).")
    deduplicate: bool = Field(
        False, description="Drop a record identical to one read before it, in any source (every field but where it "
        "came from; a .txt document by its text): overlapping datasets mixed train on each record once, and no "
        "held-out record is also trained on. The count is printed.",
    )
    learn_replies: Literal["all", "last"] = Field(
        "all", description="Chat sources: learn from every assistant reply, or from the last one only (the earlier "
        "ones are context, as LLaMA-Factory's `mask_history`; a `weight` 0 reply is never learned).",
    )
    chat_template: str = Field(
        "gptj-chat",
        min_length=1,
        description="Chat sources: `gptj-chat` (`### User:` / `### Assistant:` turns, each reply ended by EOS; no new "
        "tokens) or your own Jinja template, as transformers' `chat_template`. The export's tokenizer carries it.",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of records held out for evaluation.")
    eval_max: int = Field(1000, ge=0, description="At most this many held-out records.")
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail", description="A malformed record: fail with file and line, or skip it and print the count."
    )
    workers: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="Cores data preparation uses: tokenizing threads, and processes rendering and tokenizing "
        "conversations once a build has over 1,024 of them (with a recipe's own chat template; the built-in "
        "gptj-chat is rendered in Python, faster in one process). auto: every core this process may run on (its "
        "affinity: taskset, a scheduler's allocation). Does not change the prepared data.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where prepared token stores are kept and shared by runs (one folder per content key); "
        "null: $GPTJ_TUNE_DATA_CACHE, else ~/.cache/gptj-tune/data. Put it on a filesystem every machine "
        "sees and the data is prepared once for all of them.",
    )

    @model_validator(mode="after")
    def _check_learn_replies(self):
        if self.learn_replies == "last":
            if not any(source.is_chat for source in self.sources):
                raise ValueError("data.learn_replies: last applies to chat sources (format chat), and there is none")
            if self.train_on_prompt:
                raise ValueError("data.learn_replies: last and train_on_prompt: true contradict each other (the "
                                 "latter learns every token); choose one")  # fmt: skip
        return self

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str) -> str:
        if value in ("gptj-chat",):
            return value
        if "{{" not in value and "{%" not in value:
            raise ValueError(f"{value!r} is not a built-in chat template (gptj-chat) nor a Jinja template ({{% ... %}}, {{{{ ... }}}})")
        import jinja2

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the Jinja template does not parse: {e.message} (line {e.lineno} of the template)") from None
        return value