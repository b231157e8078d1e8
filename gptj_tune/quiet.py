"""Library chatter a user cannot act on, silenced before any command runs (`cli.main`), and by
benchmarks that call our code directly."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Environment defaults and filters for library chatter; `main` runs it before the app."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our progress is the one to read
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Library chatter a user cannot act on: peft calling a renamed transformers helper,
    # DeepSpeed (imported by accelerate) announcing at WARNING level that this machine has no GPU.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    # bitsandbytes 0.50 (imported by peft) on a CPU: its optional kernels package is not installed.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())
