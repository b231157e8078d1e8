"""The loss of a batch (and of the held-out set): how a batch reaches the model (mask, packed
segments) and which loss path computes it (the fused head, or full logits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.batches import Batches
from ..data.tokens import IGNORE
from ..errors import RecipeError
from ..model.attention import block_causal_mask, mark_segments, uses_our_attention
from ..model.loss_head import loss_heads_of, model_loss
from ..recipe import Recipe


@dataclass(frozen=True)
class LossPath:
    """How a batch's loss is computed.

    fused_chunk: the model's LossHead (model/loss_head.py) computes the loss itself, this many
        tokens at a time (`model_loss`); None: full logits, then cross-entropy.
    heads: the model's LossHeads, found once at setup (else looked up in the model at every call).
    varlen: transformers' own FlashAttention-2 (models other than GPT-J): it takes no 4D mask, so
        none is built; it attends across packed examples, so packing is refused with it.
    segmented: GPT-J's attention (ours) runs within each packed example (`attention.mark_segments`):
        one variable-length FlashAttention call on a GPU, one SDPA call per example on a CPU;
        the block-causal mask is passed too, for every case those do not take. Blocks recomputed
        by gradient checkpointing run the same way (the segments travel on the position ids), and so
        do compiled blocks (their attention runs outside the graph, see `attention._attend`).
    """

    fused_chunk: int | None = None
    varlen: bool = False
    segmented: bool = False
    heads: tuple[torch.nn.Module, ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, recipe: Recipe, model=None) -> LossPath:
        """The recipe's path for `model` (None: as if its attention were ours, GPT-J's; a fused loss
        needs the model's head made a LossHead first)."""
        ours = model is None or uses_our_attention(model)
        flash = recipe.model.attn_implementation == "flash_attention_2" and not ours
        if flash and recipe.data.packing:
            raise RecipeError([
                f"model.attn_implementation: flash_attention_2 with data.packing: transformers' FlashAttention-2 "
                f"for {getattr(getattr(model, 'config', None), 'model_type', 'this model')} ignores the boundaries "
                f"between packed examples (each would attend to the ones before it in its row); use `auto` "
                f"(SDPA with the block-causal mask), or set data.packing: false"
            ])  # fmt: skip
        return cls(
            fused_chunk=recipe.train.loss_chunk_tokens if recipe.train.loss == "fused" else None,
            varlen=flash,
            segmented=ours,
            heads=(loss_heads_of(model) or None) if model is not None and recipe.train.loss == "fused" else None,
        )


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are predicted and scored (next-token labels that are not IGNORE).
    Counted on the host batch, before it moves to the device: no device-to-host wait."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def batch_loss(
    model, batch: dict[str, torch.Tensor], path: LossPath = LossPath(), host_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of the token cross-entropies of one batch (divide by `target_count` for the mean).
    `host_positions`: the batch's position ids still on the CPU, where the packed examples are read
    without waiting for the device."""
    positions, labels = batch["position_ids"], batch["labels"]
    mask = None if path.varlen else block_causal_mask(positions, torch.float32)
    inputs = dict(input_ids=batch["input_ids"], position_ids=positions, attention_mask=mask, use_cache=False)
    mark_segments(positions, use=path.segmented, host=host_positions)  # GPT-J's attention per packed example, or the mask
    if path.fused_chunk:
        return model_loss(model, labels, path.fused_chunk, heads=path.heads, **inputs)
    logits = model(**inputs).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate_loss(model, batches: Batches, accelerator, path: LossPath = LossPath()) -> float | None:
    """Mean cross-entropy per target token over every eval batch, the batches shared out over processes.

    Every process runs the same number of forwards (ZeRO-3 gathers weights collectively), so one
    whose share is a batch short repeats its last batch and does not count it.
    """
    from .engines import all_sum

    if not batches.rows:
        return None
    was_training = model.training
    model.eval()
    world, rank, n = accelerator.num_processes, accelerator.process_index, batches.device_batches
    total, count = 0.0, 0
    for k in range(-(-n // world)):
        j = k * world + rank
        batch = batches.device_batch(min(j, n - 1))
        loss_sum = batch_loss(model, to_device(batch, accelerator.device), path, host_positions=batch["position_ids"])
        if j < n:
            total, count = total + float(loss_sum), count + target_count(batch)
    model.train(was_training)
    total, count = all_sum([total, count], accelerator)
    return total / max(count, 1)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch on `device`; to a GPU through pinned memory, without waiting for the copy (a copy
    from pageable memory waits for the work queued before it, leaving the GPU idle after)."""
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
