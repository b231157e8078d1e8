"""Data, in the order it flows: formats (records with file:line) -> templates -> build (tokenized
into a token store on disk, split, weighted, packed as index arrays) -> store (memory-mapped rows)
-> batches; prepare.py opens a recipe's store from the shared cache (cache.py) or builds it."""

from .prepare import PreparedData, prepare_data, split_indices

__all__ = ["PreparedData", "prepare_data", "split_indices"]
