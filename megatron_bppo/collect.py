"""One step's rollout: prompts -> samples streamed through the engine -> rewards -> scored groups.

    prompts --(StepSchedule: AdaptiveScheduler.plan_first_round, n_init each; uniformly solved/unsolved prompts
      skipped)--> SampleRequest per sample, seeded completion_seed(step seed, prompt id, sample index)
      --(engine.stream: one continuous batch; rollout.schedule=rounds: a generate call per batch of requests)-->
      completions as they finish --(score_once: reward fn, each completion on one rank, shared)--> correct
      --(StepSchedule.resolve; a group whose samples have all finished and that is still single-class gets
        n_step more at once, up to g_max; once every group is settled and too few are mixed, drawn prompts join)
      --(algorithm.early_stop: running samples binary selection can no longer pick are stopped, counted as
        incorrect or left out)--> ... until nothing is outstanding (or `stop` says so: the rollout is abandoned)
    -> [Group] (every kept completion, in sample order) + the scheduler's counters + token accounting.
GRPO is the fixed schedule (G completions per prompt, one batch).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import torch.distributed as dist

from .algorithms import SCHEDULER_COUNTERS, AdaptiveScheduler, StepSchedule, unselectable_running
from .batch import Group
from .rewards import score_batch
from .rollout.engine import BatchStream, SampleRequest
from .seeds import completion_seed


def sampling_schedule(algo, seed: int) -> AdaptiveScheduler:
    """config.AlgorithmConfig -> how many completions each prompt gets (adaptive for BPPO, fixed G for GRPO).
    `seed` (sampling.seed) seeds the retry draws of skipped prompts (algorithm.retry_prob)."""
    if not algo.is_adaptive():
        return AdaptiveScheduler.fixed(algo.group_size)
    return AdaptiveScheduler(n_init=algo.n_init, g_max=algo.group_size, n_step=algo.n_step,
                             skip_after=algo.skip_after, skip_cooldown=algo.skip_cooldown, retry_prob=algo.retry_prob,
                             target_pairs=algo.target_pairs, max_prompt_draw_factor=algo.max_prompt_draw_factor,
                             min_mixed_rate=algo.min_mixed_rate, seed=seed)


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
    generated_tokens: int           # every token the engine produced this step, stopped samples included
    stopped_tokens: int             # tokens of samples stopped early (algorithm.early_stop)
    stopped_samples: int
    engine_steps: int               # stream.step() calls: decode steps (vLLM stream at world size 1; with several
                                    # replicas, gathers), generate calls with rollout.schedule=rounds
    interrupted: bool = False       # `stop` said so between engine steps: groups are empty, nothing was recorded

    def token_accounting(self, trained: int) -> dict:
        """generated = trained (kept prefixes of the selected samples, UpdateBatch.tokens) + reward_only (every
        other finished token) + stopped."""
        return {"generated": self.generated_tokens, "trained": trained,
                "reward_only": self.generated_tokens - trained - self.stopped_tokens, "stopped": self.stopped_tokens}


def collect_groups(engine, scheduler: AdaptiveScheduler, prompts: list, sampling, reward_fn, reward_kwargs: dict,
                   seed: int, draw_more: Optional[Callable[[int], list]] = None, streaming: bool = True,
                   early_stop: str = "off", stop: Optional[Callable[[], bool]] = None) -> RolloutResult:
    """`prompts`: rendered prompts (.example.id, .example.reference, .token_ids); `seed`: the step's rollout seed.
    Every rank calls this with the same arguments and gets the same groups (the stream gathers over replicas).
    `stop` (trainer.StopRequest.requested) is asked after every engine step, on every rank at the same step (it may
    be a collective); True closes the stream and returns at once with `interrupted` set and no outcome recorded
    in the schedule (its offers are: the trainer saves its pre-step snapshot). A stop signal must not wait for a
    rollout that can take minutes (torchrun SIGKILLs the ranks 30 s after passing on its SIGTERM)."""
    by_id: dict[str, Group] = {}
    samples: dict[str, list] = {}          # prompt id -> [(sample index, completion, reward, correct)]
    next_index: dict[str, int] = {}

    def register(rendered):
        for r in rendered:
            if r.example.id in by_id:       # the sampler never repeats an index within a step: repeated ids
                raise ValueError(f"prompt id {r.example.id!r} twice in one step: the dataset repeats ids; "
                                 "give every row a unique id")
            by_id[r.example.id] = Group(r.example.id, list(r.token_ids), r.example.reference)
            samples[r.example.id], next_index[r.example.id] = [], 0
        return [r.example.id for r in rendered]

    before = dict(scheduler.counters)
    stream = engine.stream(sampling, track_running=early_stop != "off") if streaming else BatchStream(engine,
                                                                                                       sampling)
    plan = StepSchedule(scheduler, register(prompts), (lambda n: register(draw_more(n))) if draw_more else None)

    def start(requested: dict):
        requests = []
        for pid, n in requested.items():
            first, next_index[pid] = next_index[pid], next_index[pid] + n
            requests += [SampleRequest((pid, s), pid, tuple(by_id[pid].prompt_ids), completion_seed(seed, pid, s))
                         for s in range(first, first + n)]
        stream.add(requests)

    reward_seconds, generated, stopped_tokens, stopped_samples, engine_steps = 0.0, 0, 0, 0, 0
    try:
        start(plan.requests())
        while stream.outstanding:
            step = stream.step()
            engine_steps += 1
            if stop is not None and stop():
                return RolloutResult([], {}, reward_seconds, generated, stopped_tokens, stopped_samples, engine_steps,
                                     interrupted=True)
            if step.finished:
                started = time.perf_counter()
                scores = score_once(reward_fn, [(c.text, by_id[pid].reference) for (pid, _), c in step.finished],
                                    reward_kwargs)
                reward_seconds += time.perf_counter() - started
                for ((pid, index), completion), (score, correct) in zip(step.finished, scores):
                    completion.sample_index = index
                    samples[pid].append((index, completion, score, correct))
                    generated += len(completion.token_ids)
                    plan.resolve(pid, correct)
            if early_stop != "off" and step.running:
                running: dict[str, dict] = {}
                for key, length in step.running.items():
                    running.setdefault(key[0], {})[key] = length
                doomed = [key for pid, lengths in running.items() for key in unselectable_running(
                    [(len(c.token_ids), ok) for _, c, _, ok in samples[pid] if c.finish_reason != "abort"], lengths)]
                for (pid, index), completion in (stream.stop(doomed) if doomed else {}).items():
                    generated += len(completion.token_ids)
                    stopped_tokens += len(completion.token_ids)
                    stopped_samples += 1
                    if early_stop == "as_incorrect":        # the lowest reward of the group's finished incorrect ones
                        floor = min(r for _, c, r, ok in samples[pid] if not ok and c.finish_reason != "abort")
                        completion.sample_index = index
                        samples[pid].append((index, completion, floor, False))
                    plan.resolve(pid, False if early_stop == "as_incorrect" else None)
            start(plan.requests())
    finally:
        stream.close()              # after an error: nothing left running in the engine
    state = plan.finish()
    for pid in state:
        group = by_id[pid]
        for _, completion, score, correct in sorted(samples[pid], key=lambda e: e[0]):
            group.completions.append(completion)
            group.rewards.append(score)
            group.correct.append(correct)
    counters = {k: scheduler.counters[k] - before.get(k, 0) for k in SCHEDULER_COUNTERS}
    return RolloutResult([by_id[p] for p in state], counters, reward_seconds, generated, stopped_tokens,
                         stopped_samples, engine_steps)
