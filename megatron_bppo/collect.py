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

from .algorithms import SCHEDULER_COUNTERS, run_schedule
from .batch import Group
from .rewards import score_batch


@dataclasses.dataclass
class RolloutResult:
    groups: list[Group]
    counters: dict
    reward_seconds: float
    rounds: int


def collect_groups(engine, scheduler, prompts: list, sampling, reward_fn, reward_kwargs: dict, seed: int,
                   draw_more: Optional[Callable[[int], list]] = None) -> RolloutResult:
    """`prompts`: rendered prompts (.example.id, .example.reference, .token_ids). Every rank calls this with the
    same arguments and gets the same groups (the engine gathers results over its replicas)."""
    by_id: dict[str, Group] = {}

    def register(rendered):
        for r in rendered:
            by_id[r.example.id] = Group(r.example.id, list(r.token_ids), r.example.reference)
        return [r.example.id for r in rendered]

    before = dict(scheduler.counters)
    reward_seconds, rounds = 0.0, 0

    def sample(plan: dict) -> dict:
        nonlocal reward_seconds, rounds
        ids = list(plan)
        call_sampling = dataclasses.replace(sampling, seed=seed * 1000 + rounds)
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
    state = run_schedule(scheduler, register(prompts), sample, draw)
    counters = {k: scheduler.counters[k] - before.get(k, 0) for k in SCHEDULER_COUNTERS}
    return RolloutResult([by_id[p] for p in state], counters, reward_seconds, rounds)
