"""Training data: reading inputs, tokenizing them into shards, and packed training samples."""

from .fim import apply_fim, fim_permute, fim_restore
from .packed import IGNORE_INDEX, TokenDataset, position_ids
from .prepare import load_meta, prepare_dataset
from .sources import Source, parse_input

__all__ = ["IGNORE_INDEX", "Source", "TokenDataset", "apply_fim", "fim_permute", "fim_restore", "load_meta",
           "parse_input", "position_ids", "prepare_dataset"]
