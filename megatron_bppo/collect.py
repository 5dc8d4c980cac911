"""Scheduled rollout rounds: prompts -> engine samples -> rewards -> scored groups.

    prompts --(AdaptiveScheduler.plan_first_round: n_init each, skip uniformly solved/unsolved prompts)
      --(engine.generate, one call per round)--> completions --(reward fn)--> rewards, correct
      --(plan_next_round: more samples only for still single-class groups, up to g_max)--> ... repeat
      --(prompts_needed: draw more prompts while too few groups are mixed)--> ... repeat
    -> [Group] (every sampled completion of every planned prompt) + the scheduler's decision counters.
GRPO is the fixed schedule (G completions per prompt, one round).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from .algorithms import SCHEDULER_COUNTERS, AdaptiveScheduler, run_schedule
from .batch import Group
from .rewards import score_batch
from .seeds import rollout_round_seed


def sampling_schedule(algo) -> AdaptiveScheduler:
    """config.AlgorithmConfig -> how many completions each prompt gets (adaptive for BPPO, fixed G for GRPO)."""
    if not algo.is_adaptive():
        return AdaptiveScheduler.fixed(algo.group_size)
    return AdaptiveScheduler(n_init=algo.n_init, g_max=algo.group_size, n_step=algo.n_step,
                             skip_after=algo.skip_after, skip_cooldown=algo.skip_cooldown,
                             target_pairs=algo.target_pairs, max_prompt_draw_factor=algo.max_prompt_draw_factor)


@dataclasses.dataclass
class RolloutResult:
    groups: list[Group]
    counters: dict
    reward_seconds: float
    rounds: int


def collect_groups(engine, schedule, prompts: list, sampling, reward_fn, reward_kwargs: dict, seed: int,
                   draw_more: Optional[Callable[[int], list]] = None) -> RolloutResult:
    """`prompts`: rendered prompts (.example.id, .example.reference, .token_ids). Every rank calls this with the
    same arguments and gets the same groups (the engine gathers results over its replicas)."""
    by_id: dict[str, Group] = {}

    def register(rendered):
        for r in rendered:
            by_id[r.example.id] = Group(r.example.id, list(r.token_ids), r.example.reference)
        return [r.example.id for r in rendered]

    before = dict(schedule.counters)
    reward_seconds, rounds = 0.0, 0

    def sample(plan: dict) -> dict:
        nonlocal reward_seconds, rounds
        ids = list(plan)
        call_sampling = dataclasses.replace(sampling, seed=rollout_round_seed(seed, rounds))
        results = engine.generate([by_id[p].prompt_ids for p in ids], [plan[p] for p in ids], call_sampling)
        rounds += 1
        started = time.perf_counter()
        new = {}
        for pid, completions in zip(ids, results):
            group = by_id[pid]
            scored = score_batch(reward_fn, [c.text for c in completions], [group.reference] * len(completions),
                                 **reward_kwargs)
            group.completions += completions
            group.rewards += [s.score for s in scored]
            group.correct += [bool(s.correct) for s in scored]
            new[pid] = (sum(s.correct for s in scored), len(completions))
        reward_seconds += time.perf_counter() - started
        return new

    draw = (lambda n: register(draw_more(n))) if draw_more is not None else None
    state = run_schedule(schedule, register(prompts), sample, draw)
    counters = {k: schedule.counters[k] - before.get(k, 0) for k in SCHEDULER_COUNTERS}
    return RolloutResult([by_id[p] for p in state], counters, reward_seconds, rounds)
