"""Data, in the order it flows: formats (records with file:line) -> templates -> tokens (masked
examples) -> pack (rows) -> batches; prepare.py runs the whole path for a recipe."""

from .prepare import PreparedData, prepare_data, split_indices

__all__ = ["PreparedData", "prepare_data", "split_indices"]
