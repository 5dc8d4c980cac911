"""Rewards for tests only (select with reward.name=megatron_bppo.testing.rewards:<name>).

A random tiny model never answers arithmetic correctly, so every group would be all-wrong and nothing would
train. `even_length` labels a completion correct when its generated text has an even number of characters: a
reward with no meaning, which gives mixed groups on any model and so exercises the whole update path.
"""
from megatron_bppo.rewards import RewardResult


def even_length(completion_text: str, reference: str, **_) -> RewardResult:
    correct = len(completion_text) % 2 == 0
    return RewardResult(score=1.0 if correct else 0.0, correct=correct, extracted=None)
