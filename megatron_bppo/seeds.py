"""Every seed the run derives from the config's seeds, named, in one place.

    sampling.seed --(rollout_step_seed: + step * ROLLOUT_STEP_STRIDE)--> the step's rollout seed
      --(completion_seed: hash of the prompt id, + sample index)--> each rollout sample's engine seed (the same
        random stream whichever replica, batch or moment it runs in)
    a generate() call's SamplingConfig.seed --(engine_prompt_seed: spaced ENGINE_PROMPT_STRIDE per prompt)-->
      the seed of sample j of prompt i: + j (what vLLM gives the children of an n > 1 request)
    the step's rollout seed --(selection_seed)--> seeded selectors (random_pair)
    the step's rollout seed --(minibatch_seed: per epoch)--> the order in which groups are dealt to mini-batches
    sampling.seed --(eval_seed: + EVAL_SEED_OFFSET)--> held-out mean@k sampling
    data.seed (train split, prompt order) --(+ HELD_OUT_SEED_OFFSET)--> a generated task's held-out split

Strides are primes (or powers of two spaced wider than any request's sample count) so that seeds of different
steps and prompts never coincide in practice; tests/test_rollout.py checks the per-prompt spacing.
"""
from __future__ import annotations

import hashlib

ROLLOUT_STEP_STRIDE = 7919            # the 1000th prime
STEP_SEED_SPACING = 1000              # selection_seed: step_seed * 1000 + 999, apart from every step's rollout seed
EVAL_SEED_OFFSET = 104729             # the 10000th prime
HELD_OUT_SEED_OFFSET = 1
ENGINE_PROMPT_STRIDE = 8192           # vLLM gives sample j of a request seed + j: up to 8192 samples per prompt
_ENGINE_SEED_MIX = 1_000_003
_INT31 = 2 ** 31 - 1


def rollout_step_seed(sampling_seed, step: int) -> int:
    return (sampling_seed or 0) + ROLLOUT_STEP_STRIDE * step


def completion_seed(step_seed: int, prompt_id, sample_index: int) -> int:
    """Engine seed of sample `sample_index` of prompt `prompt_id` in a step: a function of these three only, so
    a completion is the same whether it starts in the first round or joins a running batch later."""
    digest = hashlib.blake2b(f"{step_seed}|{prompt_id!r}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + sample_index) % _INT31


def selection_seed(step_seed: int) -> int:
    return step_seed * STEP_SEED_SPACING + STEP_SEED_SPACING - 1


def minibatch_seed(step_seed: int, epoch: int) -> int:
    return (step_seed * _ENGINE_SEED_MIX + epoch) % _INT31


def eval_seed(sampling_seed) -> int:
    return (sampling_seed or 0) + EVAL_SEED_OFFSET


def engine_prompt_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt vLLM seed of one generate call."""
    return (seed * _ENGINE_SEED_MIX + prompt_index * ENGINE_PROMPT_STRIDE) % _INT31
