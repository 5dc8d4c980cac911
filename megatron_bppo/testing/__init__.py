"""Tiny test fixtures only, for tests and CI: deterministic offline tokenizers and random checkpoints
(``tiny_models``) and test-only rewards (``rewards``).

Importing this package is cheap: torch/transformers/tokenizers are imported inside the functions. The real
SmolLM2-135M-Instruct preparation lives in :mod:`megatron_bppo.model.smollm2`.
"""
from megatron_bppo.testing.tiny_models import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    make_tiny_checkpoint,
    tiny_checkpoint_cache,
    tiny_corpus,
    train_tiny_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "make_tiny_checkpoint",
    "tiny_checkpoint_cache",
    "tiny_corpus",
    "train_tiny_tokenizer",
]
