"""Prompt tuning: a soft prompt of learned vectors in front of a frozen model, saved in peft's
prompt-tuning format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..recipe import PromptTuningMethod


PROMPT_WEIGHTS = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"  # peft's name for a prompt-tuning adapter's one tensor


def initial_prompt(model, method: PromptTuningMethod, tokenizer, seed: int) -> torch.Tensor:
    """The soft prompt to start from (fp32): the embeddings of `init_text`'s tokens, repeated to
    fill, or of vocabulary tokens drawn at random. Either way it starts where the model's own inputs
    live (Lester et al., 2021, found such starts train better than random ones; not measured here)."""
    weight = model.get_input_embeddings().weight
    n = method.num_virtual_tokens
    if method.init_text and tokenizer is not None:  # (none: `gptj-tune plan`, which needs shapes only)
        ids = tokenizer(method.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RecipeError([f"method.init_text {method.init_text!r} has no tokens; write some text or remove it"])
        ids = (ids * -(-n // len(ids)))[:n]
    else:
        vocab = len(tokenizer) if tokenizer is not None else weight.shape[0]
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return weight.detach()[torch.tensor(ids, device=weight.device)].float().clone()


class SoftPromptModel(torch.nn.Module):
    """A frozen causal LM behind a learned soft prompt of `n` vectors (prompt tuning).

    Two ways in, one meaning: the prompt takes positions 0..n-1 and the text follows from n.
    - Training and scoring batches (`prepare_data(..., prompt_slots=n)`) start every example with n
      slot tokens and pass position_ids, which restart at 0 for each example: positions below n take
      the prompt's vectors. So each packed example sees the prompt exactly as it would alone.
    - Plain callers (lm-eval, generation, export checks) pass the text alone: the prompt is put in
      front, and the logits of its positions are dropped, so logits line up with input_ids.
    Saved in peft's prompt-tuning format: `PeftModel.from_pretrained(base, folder)` loads it too.
    """

    def __init__(self, model, prompt: torch.Tensor):
        super().__init__()
        self.model = model
        self.prompt = torch.nn.Parameter(prompt)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def tie_weights(self, *args, **kwargs):  # lm-eval calls it on the model it is handed
        return self.model.tie_weights(*args, **kwargs)

    def _prompt_then(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        tokens = self.model.get_input_embeddings()(input_ids)
        batch, n = input_ids.shape[0], self.num_virtual_tokens
        embeds = torch.cat([self.prompt.to(tokens.dtype).expand(batch, -1, -1), tokens], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return embeds, torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask=None, **kwargs):
        n = self.num_virtual_tokens
        if position_ids is not None:  # a batch laid out with prompt slots
            tokens = self.model.get_input_embeddings()(input_ids)
            vectors = F.embedding(position_ids.clamp(0, n - 1), self.prompt.to(tokens.dtype))
            embeds = torch.where((position_ids < n).unsqueeze(-1), vectors, tokens)
            return self.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, **kwargs)
        embeds, attention_mask = self._prompt_then(input_ids, attention_mask)
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, n:]
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids followed by the new tokens, as `generate` returns them for any model."""
        embeds, attention_mask = self._prompt_then(input_ids, attention_mask)
        new = self.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def save_pretrained(self, folder, state_dict: dict | None = None, **_) -> None:
        """peft's prompt-tuning adapter: adapter_config.json and the prompt as `prompt_embeddings`."""
        import peft
        from safetensors.torch import save_file

        prompt = state_dict["prompt"] if state_dict is not None else self.prompt
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.num_virtual_tokens,
            token_dim=prompt.shape[1],
            num_transformer_submodules=1,
            num_attention_heads=self.model.config.num_attention_heads,  # GPT-J's n_head, GPT-Neo's num_heads
            num_layers=self.model.config.num_hidden_layers,
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or None,
        ).save_pretrained(str(folder))
        save_file({PROMPT_KEY: prompt.detach().float().cpu().contiguous()}, str(folder / PROMPT_WEIGHTS))

    def load_saved(self, folder) -> None:
        """The prompt of a folder written by save_pretrained (or by peft for prompt tuning)."""
        self.prompt.data.copy_(read_prompt(folder).to(self.prompt.device))

    @classmethod
    def from_saved(cls, model, folder) -> SoftPromptModel:
        return cls(model.requires_grad_(False), read_prompt(folder).to(model.get_input_embeddings().weight.device))


def read_prompt(folder) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / PROMPT_WEIGHTS))[PROMPT_KEY].float()


def is_prompt_tuning_folder(folder) -> bool:
    """Whether a folder holds a peft prompt-tuning adapter (rather than LoRA or a whole model)."""
    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("peft_type") == "PROMPT_TUNING"
    except (OSError, ValueError, AttributeError):
        return False


def prompt_slots_of(model) -> int:
    """Slot positions a model's scoring batches need in front of every example (0: none)."""
    model = getattr(model, "module", model)  # DDP's wrapper
    return model.num_virtual_tokens if isinstance(model, SoftPromptModel) else 0
