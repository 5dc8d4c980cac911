"""Rewards: final-answer extraction, answer equivalence (math-verify) and reward functions registered by name.

    from megatron_bppo.rewards import get_reward, score_batch
    fn = get_reward("gsm8k")                      # built-ins: "gsm8k", "math"
    fn("... #### 1,234", "1234")                  # RewardResult(score=1.0, correct=True, extracted='1,234', ...)
    score_batch(fn, texts, references, format_bonus=0.1)
"""
from megatron_bppo.rewards.extract import (Extraction, extract_answer, extract_boxed, extract_hash,
                                           extract_last_number, normalize_number, to_fraction)
from megatron_bppo.rewards.registry import (RewardFn, RewardResult, UnknownRewardError, get_reward, list_rewards,
                                            register_reward, reward_from_config, score_batch,
                                            validate_reward_kwargs)
# importing math registers the built-in rewards "math" and "gsm8k" (registry.py does not know them)
from megatron_bppo.rewards.math import Match, answers_match, gsm8k_reward, math_reward, reference_answer

__all__ = [
    "Extraction", "Match", "RewardFn", "RewardResult", "UnknownRewardError", "answers_match", "extract_answer",
    "extract_boxed", "extract_hash", "extract_last_number", "get_reward", "gsm8k_reward", "list_rewards",
    "math_reward", "normalize_number", "reference_answer", "register_reward", "reward_from_config", "score_batch",
    "to_fraction", "validate_reward_kwargs",
]
