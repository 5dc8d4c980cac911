"""Deterministic, offline test fixtures: tiny tokenizers and checkpoints, and the real SmolLM2-135M-Instruct.

Importing this package is cheap: torch/transformers/tokenizers are imported inside the functions.
"""
from megatron_bppo.testing.tiny_models import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    make_tiny_checkpoint,
    tiny_checkpoint_cache,
    tiny_corpus,
    train_tiny_tokenizer,
)
from megatron_bppo.testing.smollm2 import default_smollm2_dir, prepare_smollm2, read_smollm2_info

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "default_smollm2_dir",
    "make_tiny_checkpoint",
    "prepare_smollm2",
    "read_smollm2_info",
    "tiny_checkpoint_cache",
    "tiny_corpus",
    "train_tiny_tokenizer",
]
