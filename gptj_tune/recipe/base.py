"""The base of every recipe section, and the name of the built-in model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

TINY_MODEL_NAME = "tiny-gptj"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
