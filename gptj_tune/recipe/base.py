"""The base of every recipe section, and the name of the built-in model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

TINY_MODEL_NAME = "tiny-gptj"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are read-only, and numbers are
    finite (YAML reads `1e400` as infinity, which a learning rate would turn into NaN at step 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
