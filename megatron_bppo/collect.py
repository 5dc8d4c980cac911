"""Scheduled rollout rounds: prompts -> engine samples -> rewards -> scored groups.

    prompts --(AdaptiveScheduler.plan_first_round: n_init each, skip uniformly solved/unsolved prompts)
      --(engine.generate, one call per round)--> completions --(score_once: reward fn, each completion on one rank,
      shared)--> rewards, correct
      --(plan_next_round: more samples only for still single-class groups, up to g_max)--> ... repeat
      --(prompts_needed: draw more prompts while too few groups are mixed)--> ... repeat
    -> [Group] (every sampled completion of every planned prompt) + the scheduler's decision counters.
GRPO is the fixed schedule (G completions per prompt, one round).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch.distributed as dist

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


def score_once(reward_fn, pairs: list[tuple[str, str]], reward_kwargs: dict) -> list[tuple[float, bool]]:
    """(completion text, reference) -> (score, correct), each pair scored exactly once over all ranks and shared.

    Every rank must agree on every reward (they decide selection, the schedule and micro-batch counts: ranks that
    disagree hang or silently diverge), but math verification has wall-clock timeouts that count as wrong, so a
    slow rank could score differently. So rank r scores pairs r, r + W, ... and all_gather_object shares them
    (collective: every rank calls this with the same pairs)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [(s.score, bool(s.correct)) for s in score_batch(reward_fn, [t for t, _ in pairs],
                                                                 [r for _, r in pairs], **reward_kwargs)]
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = pairs[rank::world]
    local = [(s.score, bool(s.correct)) for s in score_batch(reward_fn, [t for t, _ in mine], [r for _, r in mine],
                                                              **reward_kwargs)]
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out: list = [None] * len(pairs)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


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
            if r.example.id in by_id:       # the sampler never repeats an index within a step: repeated ids
                raise ValueError(f"prompt id {r.example.id!r} twice in one step: the dataset repeats ids; "
                                 "give every row a unique id")
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
        scores = iter(score_once(reward_fn, [(c.text, by_id[pid].reference) for pid, cs in zip(ids, results)
                                             for c in cs], reward_kwargs))
        new = {}
        for pid, completions in zip(ids, results):
            group = by_id[pid]
            scored = [next(scores) for _ in completions]
            group.completions += completions
            group.rewards += [score for score, _ in scored]
            group.correct += [correct for _, correct in scored]
            new[pid] = (sum(correct for _, correct in scored), len(completions))
        reward_seconds += time.perf_counter() - started
        return new

    draw = (lambda n: register(draw_more(n))) if draw_more is not None else None
    state = run_schedule(schedule, register(prompts), sample, draw)
    counters = {k: schedule.counters[k] - before.get(k, 0) for k in SCHEDULER_COUNTERS}
    return RolloutResult([by_id[p] for p in state], counters, reward_seconds, rounds)
