"""Argument checks the benchmark scripts share: a bad argument is one line, before any work."""

from __future__ import annotations


def require_at_least_one(args, *names: str) -> None:
    """Each of these options, where given, is 1 or more."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: use 1 or more")


def require_device(shape: str, device: str) -> None:
    """GPT-J-6B's shape runs on a GPU only, and `--device cuda` needs a CUDA device torch can see."""
    if shape == "gptj-6b" and device != "cuda":
        raise SystemExit("the gptj-6b shape runs on a GPU only (--device cuda)")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
