"""Disk space: what a run's checkpoints and final model will take, checked against the free space of
`output.dir` before training and before each save, so that a full disk is one message with the
numbers instead of a library's traceback halfway through a write.

A checkpoint's size is estimated from the model and optimizer until one is saved; from then on the
size of the last one saved is used.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RunDirError, first_line

MARGIN = 1.05  # metadata, tokenizer files, rounding
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What libraries say when a write fails for space without keeping the errno: safetensors
# ("No space left on device"), torch.save's zip writer ("file write failed", "unexpected pos").
DISK_WORDS = ("No space left", "Disk quota exceeded", "File too large", "file write failed", "unexpected pos")


class DiskFullError(RunDirError):
    """Not enough space to save; nothing was left half-written."""


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception from a write is the disk (or a quota, or a file size limit) running out."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return True
    return any(word in str(e) for word in DISK_WORDS) or _SHORT_WRITE.search(str(e)) is not None


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # NumPy's tofile when the disk fills (no errno)


def disk_full_message(e: BaseException) -> str | None:
    """The one line for a full disk that no command foresaw (`run`, `data prepare` and `export` say
    more); None for any other error. Every command writes to a temp name first and removes it on
    an error, so nothing is left half-written."""
    if not is_disk_full(e):
        return None
    said = first_line(e)
    return f"the disk is full ({said}); nothing half-written was left. Free space, then run the command again"


@dataclass
class DiskNeeds:
    """Bytes one checkpoint and final/ take."""

    checkpoint: int
    final: int
    enabled: bool = True  # train.check_disk: check before saving (a save that fails is reported either way)

    @classmethod
    def estimate(cls, model: torch.nn.Module, recipe) -> DiskNeeds:
        """From the model as built (before any engine wraps it). A LoRA or prompt-tuning run saves its
        trainable weights; full fine-tuning the whole model. Optimizer states: AdamW's two moments in the
        weight's dtype (and KahanAdamW's compensation for 16-bit weights), 8-bit moments for adamw_8bit,
        fp32 master weights and moments under DeepSpeed."""
        seen, every, trainable, elements = set(), 0, 0, 0
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions at load: ds_numel is the whole
            every += n * p.element_size()
            if p.requires_grad:
                trainable += n * p.element_size()
                elements += n
        weights = every if recipe.method.kind == "full" else trainable
        sixteen = trainable < 4 * elements
        if recipe.distributed.backend == "deepspeed":
            states = 12 * elements
        elif recipe.train.optimizer == "adamw_8bit":
            states = 2 * elements + (trainable if sixteen else 0)
        else:
            states = 2 * trainable + (trainable if sixteen and recipe.train.kahan_summation else 0)
        return cls(checkpoint=int((weights + states) * MARGIN) + (1 << 20), final=int(weights * MARGIN) + (1 << 20),
                   enabled=recipe.train.check_disk)

    def check_run(self, run, recipe, saves: int, existing: int) -> None:
        """Before training: room for the checkpoints that will be on disk at once (keep_last, plus the
        one being written) and for final/."""
        if not self.enabled:
            return
        at_once = max(0, min(existing + saves, recipe.train.keep_last + 1) - existing)
        need = at_once * self.checkpoint + self.final
        free = free_bytes(run.path)
        if free < need:
            what = f"{at_once} checkpoint(s) of ~{size(self.checkpoint)} (train.keep_last {recipe.train.keep_last}) and final/ of ~{size(self.final)}"
            raise DiskFullError(
                f"{run.path}: the run needs {size(need)} of disk ({what}); its filesystem has {size(free)} free. Free space, "
                f"lower train.keep_last, set output.dir on a larger disk, or turn the check off with train.check_disk=false"
            )

    def check_save(self, folder: Path, what: str, need: int, then: str) -> None:
        if not self.enabled:
            return
        free = free_bytes(folder)
        if free < need:
            raise DiskFullError(disk_message(folder, what, need, then, free))

    @contextlib.contextmanager
    def saving(self, folder: Path, what: str, need: int, then: str, check: bool = True):
        """A save of `what` (`need` bytes) under `folder`: the free space checked first (with
        `check`: the main process), and a write that fails for space turned into a DiskFullError
        saying what to do (`then`)."""
        if check:
            self.check_save(folder, what, need, then)
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise DiskFullError(disk_message(folder, what, need, then)) from None


def disk_message(folder: Path, what: str, need: int, then: str, free: int | None = None) -> str:
    """The one line for a save that does not fit: where, needed and free bytes, what to do."""
    free = free_bytes(folder) if free is None else free
    return (f"not enough disk to save {what} in {folder}: it needs ~{size(need)}, the filesystem has {size(free)} free; "
            f"nothing was half-written and every earlier checkpoint is kept. Free space, then {then}")  # fmt: skip


def planned_saves(recipe, step: int, total_steps: int) -> int:
    """Checkpoints the run will still save after `step`."""
    every = recipe.train.save_every
    periodic = (total_steps // every - step // every) if every else 0
    at_end = recipe.train.checkpoint_at_end and not (every and total_steps % every == 0)
    return periodic + int(at_end and step < total_steps)
