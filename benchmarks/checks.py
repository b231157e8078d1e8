"""Argument checks the benchmark scripts share: a bad argument is one line, before any work."""

from __future__ import annotations

from pathlib import Path


def require_at_least_one(args, *names: str) -> None:
    """Each of these options, where given, is 1 or more."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: use 1 or more")


def require_device(shape: str, device: str) -> None:
    """The full-size shapes (GPT-J-6B, GPT-Neo-2.7B) run on a GPU only, and `--device cuda` needs a
    CUDA device torch can see."""
    if shape in ("gptj-6b", "gpt-neo-2.7b") and device != "cuda":
        raise SystemExit(f"the {shape} shape runs on a GPU only (--device cuda)")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")


def require_max_length(max_length: int) -> None:
    """Rows of 64 to 2048 tokens: GPT-J's context, and room for a response after Alpaca's prompt."""
    if not 64 <= max_length <= 2048:
        raise SystemExit(f"--max-length {max_length}: use 64 to 2048 (GPT-J's context; the Alpaca template's "
                         f"prompt alone takes ~40 tokens, so shorter rows keep no response tokens to train on)")  # fmt: skip


def require_alpaca(data_dir: str) -> Path:
    """The shared data folder, which must hold alpaca/alpaca_data.json."""
    data = Path(data_dir)
    if not (data / "alpaca" / "alpaca_data.json").exists():
        raise SystemExit(f"--data-dir: {data} has no alpaca/alpaca_data.json (the shared data folder)")
    return data
