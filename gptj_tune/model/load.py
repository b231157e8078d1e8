"""Load or build the model and tokenizer a recipe names, with the GPT-J family facts handled.

- any hub id or local folder loads with `from_pretrained`;
- `tiny-gptj` is built here from a config with a seeded init, with a byte-level BPE trained on our
  demo data, and saved so `from_pretrained` works on the result;
- GPT-J's tokenizer has no pad token (EOS pads; padding is masked by position, see data/batches.py)
  and its embedding has 50400 rows for 50257 tokens: embeddings are grown if needed, never shrunk.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import ModelError, first_line
from ..hub import offline_by_choice, probe_unless_local, unreachable_note
from ..recipe import TINY_MODEL_NAME, ModelSection
from .attention import use_sdpa_attention
from .kernels import use_one_kernel_gelu

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip

# LoRA targets per model family (config.model_type).
LORA_TARGETS = {
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
}
GPTJ_PADDED_VOCAB = 50400  # GPT-J-6B's embedding rows (a multiple of 64 over the 50257-token tokenizer)
EOS_TEXT = "<|endoftext|>"


def lora_targets(model_type: str) -> list[str]:
    if model_type not in LORA_TARGETS:
        raise ModelError(
            f"no default LoRA targets for model type {model_type!r}; set method.target_modules to a list of "
            f"module names, or to `all-linear`"
        )
    return LORA_TARGETS[model_type]


def resolve_base(section: ModelSection, run_dir: Path) -> str:
    """The path or hub id to load: for tiny-gptj, build it into `run_dir/base-model` first (once)."""
    if section.name_or_path != TINY_MODEL_NAME:
        return section.name_or_path
    target = run_dir / "base-model"
    if not (target / "config.json").exists():
        build_tiny_gptj(section, target)
    return str(target)


def model_context(config) -> int | None:
    """The positions a model has (GPT-J's n_positions, GPT-Neo's max_position_embeddings), if it says."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_fits_context(model, max_length: int) -> None:
    """Refuse rows longer than the positions the model has, which would otherwise fail deep inside
    its rotary or position lookup."""
    context = model_context(model.config)
    if context is not None and max_length > context:
        raise ModelError(f"data.max_length {max_length} is longer than the model's context ({context} positions): "
                         f"set data.max_length to {context} or less")  # fmt: skip


def check_targets(model, names: list[str], key: str) -> None:
    """Every name in a LoRA module list must match a module (peft's rule: the name, or a name ending
    in `.NAME`); peft itself trains on silently when only some match."""
    import torch

    modules = [name for name, _ in model.named_modules()]
    unmatched = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
    if unmatched:
        kinds = (torch.nn.Linear, torch.nn.Embedding)
        layers = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, kinds)})
        raise ModelError(f"{key}: {', '.join(map(repr, unmatched))} matches no module of this {model.config.model_type} "
                         f"model; its linear and embedding layers are named {', '.join(layers)}")  # fmt: skip


def load_model_and_tokenizer(section: ModelSection, base: str, quantized=None, device: torch.device | None = None):
    """Load what `base` names (a local folder or hub id) as the recipe's `model` section asks;
    `quantized` (a QLoraMethod): its linear layers in 4 bits, loaded straight onto `device`."""
    tokenizer = load_tokenizer(section.tokenizer if section.name_or_path != TINY_MODEL_NAME else None, base, section)
    extra = {}
    if quantized is not None:
        from .quantize import one_layout_for_training_and_inference, quantized_loading

        extra = quantized_loading(quantized, DTYPES[section.dtype], device or torch.device("cpu"))
    model = _from_pretrained(base, section, extra)
    if quantized is not None:
        one_layout_for_training_and_inference(model)
    _fix_special_tokens(tokenizer, model.config)
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local shard is empty
    if len(tokenizer) > rows:  # grow only: GPT-J's 50400 rows already cover 50257 tokens
        model.resize_token_embeddings(len(tokenizer))
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every block, non-reentrant: transformers >= 5.2x names it
    `activation_checkpointing_enable` (the old name warns on every run), older ones only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _from_pretrained(base: str, section: ModelSection, extra: dict | None = None):
    """Load with the recipe's attention and one-kernel GELU (model/attention.py, model/kernels.py);
    `extra`: more from_pretrained arguments (a quantization config and where to put the weights)."""
    model = _load_with_attention(base, section, extra or {})
    use_one_kernel_gelu(model)
    return model


def _load_with_attention(base: str, section: ModelSection, extra: dict):
    """GPT-J's `sdpa` and `flash_attention_2` are ours: load eager, then switch modules. (transformers'
    GPT-J FlashAttention-2 would attend across packed examples: it passes the kernel neither a mask
    nor the restarting positions.)"""
    from transformers import AutoConfig

    probe_unless_local(base)
    requested = section.attn_implementation
    if requested in ("auto", "sdpa", "flash_attention_2"):
        try:
            config = AutoConfig.from_pretrained(base, revision=section.revision, trust_remote_code=section.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(_load_hint(base, "model", e, section.revision)) from None
        if config.model_type == "gptj":
            if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                raise ModelError(
                    "model.attn_implementation: flash_attention_2 needs the flash-attn package (`pip install flash-attn`, "
                    "CUDA GPUs); `auto` needs nothing: on a GPU it runs packed rows through torch's own variable-length "
                    "FlashAttention kernel (torch >= 2.10)"
                )
            model = _load(base, section, "eager", extra)
            use_sdpa_attention(model, varlen="flash_attn" if requested == "flash_attention_2" else "torch")
            return model
        if requested == "auto":
            try:  # each attempt builds its own config: a failed "sdpa" must not leak into the next
                return _load(base, section, "sdpa", extra, quiet=True)
            except _AttentionUnsupported:
                return _load(base, section, "eager", extra)
    return _load(base, section, requested, extra)


class _AttentionUnsupported(Exception):
    pass


def _load(base: str, section: ModelSection, attn: str, extra: dict, quiet: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            base, revision=section.revision, dtype=DTYPES[section.dtype],
            attn_implementation=attn, trust_remote_code=section.trust_remote_code, **extra,
        )  # fmt: skip
    except (OSError, ValueError, ImportError) as e:
        if attn != "eager" and ("attn_implementation" in str(e) or "attention" in str(e).lower()):
            if quiet:
                raise _AttentionUnsupported from None
            raise ModelError(
                f"model.attn_implementation: {attn!r} is not available for {base} ({first_line(e)}); "
                f"use `auto` or `eager`"
            ) from None
        raise ModelError(_load_hint(base, "model", e, section.revision)) from None


def load_tokenizer(name: str | None, base: str, section: ModelSection):
    from transformers import AutoTokenizer

    source = name or base
    probe_unless_local(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=section.revision if source == base else None, trust_remote_code=section.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(_load_hint(source, "tokenizer", e, section.revision if source == base else None)) from None
    return tokenizer


def tokenizer_as_trained(section: ModelSection, scratch: Path):
    """The tokenizer a run of this model section trains with, EOS and pad set as training sets
    them, without loading the weights (`gptj-tune data`). The built-in tiny model is built into
    `scratch` first, as a run builds it into its directory."""
    from transformers import AutoConfig

    base = resolve_base(section, scratch)
    tokenizer = load_tokenizer(section.tokenizer if section.name_or_path != TINY_MODEL_NAME else None, base, section)
    try:
        config = AutoConfig.from_pretrained(base, revision=section.revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as e:
        from ..plan import KNOWN_SHAPES

        if KNOWN_SHAPES.get(section.name_or_path) != "gptj":
            raise ModelError(_load_hint(base, "model", e, section.revision)) from None
        # GPT-J-6B's special tokens are GPTJConfig's defaults: its data can be prepared offline
        # with a local tokenizer (model.tokenizer), on a machine that lacks the weights.
        from transformers import GPTJConfig

        config = GPTJConfig()
    _fix_special_tokens(tokenizer, config)
    return tokenizer


def _load_hint(name: str, what: str, error: Exception, revision: str | None = None) -> str:
    first = first_line(error)
    if Path(name).exists():
        return f"model.name_or_path: could not load the {what} from folder {name} ({first})"
    offline = unreachable_note() or (" HF_HUB_OFFLINE is set, so nothing is downloaded." if offline_by_choice() else "")
    return (
        f"model.name_or_path: {name!r} is not a local folder, and loading the {what} from the hub failed "
        f"({first}).{offline} Download it on a machine with network access (e.g. `hf download {name}"
        f"{f' --revision {revision}' if revision else ''} --local-dir DIR`) and set model.name_or_path to DIR, or use "
        f"`{TINY_MODEL_NAME}` to try the toolkit offline."
    )


def _fix_special_tokens(tokenizer, config) -> None:
    """GPT-J/GPT-2 tokenizers often load without EOS or pad: take EOS from the model config."""
    if tokenizer.eos_token is None:
        eos_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
        if eos_id is not None and eos_id < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        elif EOS_TEXT in tokenizer.get_vocab():
            tokenizer.eos_token = EOS_TEXT
        else:
            raise ModelError("the tokenizer has no EOS token and the model config names none; set one in tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ------------------------------------------------------------------------------- tiny built-in


def build_tiny_gptj(section: ModelSection, out_dir: Path) -> None:
    """Build the seeded tiny GPT-J (and, unless `model.tokenizer` is set, its tokenizer) into out_dir."""
    from transformers import GPTJForCausalLM

    tiny = section.tiny
    tokenizer = load_tokenizer(section.tokenizer, section.tokenizer, section) if section.tokenizer else _train_demo_tokenizer(tiny.vocab_size)
    _fix_special_tokens_without_config(tokenizer)
    vocab = len(tokenizer) if not section.tokenizer else max(len(tokenizer), GPTJ_PADDED_VOCAB)
    config = tiny_gptj_config(section, vocab, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = GPTJForCausalLM(config)
    from ..rundir import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def tiny_gptj_config(section: ModelSection, vocab: int, eos_id: int):
    """The GPTJConfig of the built-in tiny model."""
    from transformers import GPTJConfig

    tiny = section.tiny
    return GPTJConfig(
        vocab_size=vocab,
        n_positions=tiny.context,
        n_embd=tiny.width,
        n_layer=tiny.layers,
        n_head=tiny.heads,
        rotary_dim=tiny.rotary_dim,
        n_inner=4 * tiny.width,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=tiny.init_std,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )


def _fix_special_tokens_without_config(tokenizer) -> None:
    if tokenizer.eos_token is None:
        if EOS_TEXT not in tokenizer.get_vocab():
            raise ModelError(f"model.tokenizer has no EOS token and no {EOS_TEXT!r}; GPT-J needs one")
        tokenizer.eos_token = EOS_TEXT
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _train_demo_tokenizer(vocab_size: int):
    """A byte-level BPE trained on our generated demo data: any text encodes, demo words are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.synthetic import generate_records
    from ..data.templates import BUILTIN_TEMPLATES

    corpus = []
    for record in generate_records(3000, seed=12345):
        for template in BUILTIN_TEMPLATES.values():
            corpus.append(template.render_prompt(record["instruction"], record["input"]) + template.render_response(record["output"]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TEXT, pad_token=EOS_TEXT, bos_token=EOS_TEXT)
