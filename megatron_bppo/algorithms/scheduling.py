"""Adaptive completion scheduling: how many completions each prompt gets, decided between rollout rounds.

The policy (our definition; the paper only names the idea, see docs/algorithm.md):
  1. skip: a prompt whose last ``skip_after`` recorded groups were all solved (every completion correct) or
     all unsolved is skipped when offered. It comes back after ``skip_cooldown`` skipped offers, or earlier
     with probability ``retry_prob`` per offer (deterministic: a hash of seed, prompt id and offer number).
     ``skip_after = 0`` disables skipping.
  2. first round: ``n_init`` completions for each kept prompt.
  3. next rounds: a group that is still single-class (and non-empty) gets ``min(n_step, g_max - n)`` more,
     until it is mixed or has ``g_max`` completions.
  4. more prompts: when fewer than ``target_pairs`` groups are mixed, draw
     ``ceil((target_pairs - mixed) / rate)`` more prompts, rate = mixed / drawn so far this step (or the last
     step's rate, floored at ``min_mixed_rate``), within a budget of ``max_prompt_draw_factor * base_prompts``
     prompts per step. ``target_pairs = None`` disables this.
  5. record: the final (n_correct, n_total) of every group goes into the prompt's history.
Plain GRPO with a fixed group size G is ``AdaptiveScheduler.fixed(G)``. Prompt ids must be int or str.
``counters`` (cumulative) and ``step_counters`` (since the last ``end_step``) count every decision.
"""
from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple

HISTORY_WINDOW = 4                  # outcomes remembered per prompt (default); skip_after cannot exceed it
COUNTERS = ("prompts_offered", "prompts_planned", "prompts_skipped_solved", "prompts_skipped_unsolved",
            "prompts_retried", "first_round_samples", "extra_rounds", "extra_samples", "groups_extended",
            "groups_rescued", "groups_exhausted", "prompts_drawn_extra", "groups_recorded", "groups_mixed",
            "groups_all_correct", "groups_all_wrong", "steps", "steps_below_target")


class AdaptiveScheduler:
    """Pure-python scheduling policy; call order per step: plan_first_round -> plan_next_round* ->
    (prompts_needed -> plan_first_round -> plan_next_round*)* -> record per group -> end_step.
    ``StepSchedule`` below drives exactly that sequence from completion events."""

    def __init__(self, n_init: int = 8, g_max: int = 16, n_step: int = 4, history_window: int = HISTORY_WINDOW,
                 skip_after: int = 2, skip_cooldown: Optional[int] = 4, retry_prob: float = 0.0,
                 target_pairs: Optional[int] = None, max_prompt_draw_factor: float = 2.0,
                 min_mixed_rate: float = 0.1, seed: int = 0):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"scheduling {field} {msg}")
        need(isinstance(n_init, int) and n_init >= 1, "n_init", f"must be an integer >= 1, got {n_init!r}")
        need(isinstance(g_max, int) and g_max >= n_init, "g_max", f"must be an integer >= n_init, got {g_max!r}")
        need(isinstance(n_step, int) and n_step >= 1, "n_step", f"must be an integer >= 1, got {n_step!r}")
        need(isinstance(skip_after, int) and skip_after >= 0, "skip_after",
             f"must be an integer >= 0, got {skip_after!r}")
        need(isinstance(history_window, int) and history_window >= max(skip_after, 1), "history_window",
             f"must be an integer >= max(skip_after, 1), got {history_window!r}")
        need(skip_cooldown is None or (isinstance(skip_cooldown, int) and skip_cooldown >= 1), "skip_cooldown",
             f"must be None or an integer >= 1, got {skip_cooldown!r}")
        need(0.0 <= retry_prob <= 1.0, "retry_prob", f"must be in [0, 1], got {retry_prob!r}")
        need(target_pairs is None or (isinstance(target_pairs, int) and target_pairs >= 1), "target_pairs",
             f"must be None or an integer >= 1, got {target_pairs!r}")
        need(max_prompt_draw_factor >= 1.0, "max_prompt_draw_factor", f"must be >= 1, got {max_prompt_draw_factor!r}")
        need(0.0 < min_mixed_rate <= 1.0, "min_mixed_rate", f"must be in (0, 1], got {min_mixed_rate!r}")
        self.n_init, self.g_max, self.n_step = n_init, g_max, n_step
        self.history_window, self.skip_after, self.skip_cooldown = history_window, skip_after, skip_cooldown
        self.retry_prob, self.target_pairs = float(retry_prob), target_pairs
        self.max_prompt_draw_factor = float(max_prompt_draw_factor)
        self.min_mixed_rate, self.seed = min_mixed_rate, seed
        self.history: Dict[Hashable, deque] = {}
        self._skipped: Dict[Hashable, int] = {}   # consecutive skipped offers since last admission
        self._offers: Dict[Hashable, int] = {}    # offers so far (feeds the retry hash)
        self._extended: set = set()               # groups given extra samples in the current step
        self._last_mixed_rate: Optional[float] = None
        self.counters = {k: 0 for k in COUNTERS}
        self.step_counters = {k: 0 for k in COUNTERS}

    @classmethod
    def fixed(cls, group_size: int) -> "AdaptiveScheduler":
        """Non-adaptive GRPO: G completions for every prompt, no skipping, no extra rounds or prompts."""
        return cls(n_init=group_size, g_max=group_size, skip_after=0, history_window=1)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n
        self.step_counters[key] += n

    def _uniform_streak(self, pid) -> Optional[str]:
        h = self.history.get(pid)
        if self.skip_after == 0 or h is None or len(h) < self.skip_after:
            return None
        last = list(h)[-self.skip_after:]
        return "solved" if all(f >= 1.0 for f in last) else "unsolved" if all(f <= 0.0 for f in last) else None

    def _retry_draw(self, pid, offer: int) -> float:
        digest = hashlib.blake2b(f"{self.seed}|{pid!r}|{offer}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0 ** 64

    def plan_first_round(self, prompt_ids: Iterable[Hashable]) -> Dict[Hashable, int]:
        """``{prompt_id: n_init}`` for the offered prompts that are not skipped (skipped ones are absent)."""
        ids = list(prompt_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("plan_first_round got duplicate prompt ids; give each prompt a unique id")
        plan = {}
        for pid in ids:
            self._count("prompts_offered")
            offer = self._offers.get(pid, 0)
            self._offers[pid] = offer + 1
            streak = self._uniform_streak(pid)
            if streak is not None:
                cooled = self.skip_cooldown is not None and self._skipped.get(pid, 0) >= self.skip_cooldown
                if cooled or self._retry_draw(pid, offer) < self.retry_prob:
                    self._count("prompts_retried")
                else:
                    self._skipped[pid] = self._skipped.get(pid, 0) + 1
                    self._count(f"prompts_skipped_{streak}")
                    continue
            self._skipped.pop(pid, None)
            plan[pid] = self.n_init
            self._count("prompts_planned")
            self._count("first_round_samples", self.n_init)
        return plan

    def plan_next_round(self, group_state: Mapping[Hashable, Tuple[int, int]]) -> Dict[Hashable, int]:
        """``{prompt_id: n_more}`` for groups that are single-class, non-empty and below ``g_max``."""
        plan = {}
        for pid, (nc, nt) in group_state.items():
            if not (0 <= nc <= nt):
                raise ValueError(f"group {pid!r}: need 0 <= n_correct <= n_total, got ({nc}, {nt})")
            if nt > 0 and nc in (0, nt) and nt < self.g_max:
                plan[pid] = min(self.n_step, self.g_max - nt)
                if pid not in self._extended:
                    self._extended.add(pid)
                    self._count("groups_extended")
        if plan:
            self._count("extra_rounds")
            self._count("extra_samples", sum(plan.values()))
        return plan

    def prompts_needed(self, num_mixed: int, num_drawn: int, base_prompts: int) -> int:
        """How many more prompts to draw this step so that about ``target_pairs`` groups are mixed.

        need = target_pairs - num_mixed;  rate = num_mixed / num_drawn (if > 0) else last step's rate,
        floored at min_mixed_rate;  extra = min(ceil(need / rate), floor(factor * base_prompts) - num_drawn).
        """
        if self.target_pairs is None or num_mixed >= self.target_pairs:
            return 0
        budget = int(math.floor(self.max_prompt_draw_factor * base_prompts)) - num_drawn
        if budget <= 0:
            return 0
        rate = num_mixed / num_drawn if num_mixed > 0 and num_drawn > 0 else (self._last_mixed_rate or 0.0)
        rate = max(rate, self.min_mixed_rate)
        extra = min(int(math.ceil((self.target_pairs - num_mixed) / rate - 1e-9)), budget)
        self._count("prompts_drawn_extra", extra)
        return extra

    def record(self, prompt_id: Hashable, n_correct: int, n_total: int) -> None:
        """Store the final group outcome of this step (once per group); empty groups are not recorded."""
        if not (0 <= n_correct <= n_total):
            raise ValueError(f"group {prompt_id!r}: need 0 <= n_correct <= n_total, got ({n_correct}, {n_total})")
        if n_total == 0:
            return
        h = self.history.setdefault(prompt_id, deque(maxlen=self.history_window))
        h.append(n_correct / n_total)
        mixed = 0 < n_correct < n_total
        self._count("groups_recorded")
        self._count("groups_mixed" if mixed else "groups_all_correct" if n_correct else "groups_all_wrong")
        if prompt_id in self._extended:
            self._extended.discard(prompt_id)
            self._count("groups_rescued" if mixed else "groups_exhausted")

    def end_step(self) -> Dict[str, int]:
        """Close the step: returns and resets ``step_counters``."""
        self._count("steps")
        sc = self.step_counters
        if self.target_pairs is not None and sc["groups_mixed"] < self.target_pairs:
            self._count("steps_below_target")
        if sc["prompts_offered"]:
            self._last_mixed_rate = sc["groups_mixed"] / sc["prompts_offered"]
        self._extended.clear()
        out, self.step_counters = dict(sc), {k: 0 for k in COUNTERS}
        return out

    def state_dict(self) -> dict:
        """JSON/pickle-friendly state (ids kept as given; lists of [id, value] pairs)."""
        return {"history": [[p, list(h)] for p, h in self.history.items()],
                "skipped": [[p, n] for p, n in self._skipped.items()],
                "offers": [[p, n] for p, n in self._offers.items()],
                "last_mixed_rate": self._last_mixed_rate, "counters": dict(self.counters)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``; the constructor's config stays (it may change on resume)."""
        missing = {"history", "skipped", "offers", "last_mixed_rate", "counters"} - set(state)
        if missing:
            raise ValueError(f"scheduler state is missing {sorted(missing)}")
        self.history = {p: deque(h, maxlen=self.history_window) for p, h in state["history"]}
        self._skipped = {p: int(n) for p, n in state["skipped"]}
        self._offers = {p: int(n) for p, n in state["offers"]}
        self._last_mixed_rate = state["last_mixed_rate"]
        self.counters = {k: int(state["counters"].get(k, 0)) for k in COUNTERS}
        self.step_counters = {k: 0 for k in COUNTERS}
        self._extended = set()


class StepSchedule:
    """One step of the schedule driven by completion events, with no round barriers (pure Python).

        StepSchedule(scheduler, prompt_ids, draw_prompts)
        requests() -> {pid: n} to start now:  the first round of the offered prompts; then n_step more for every
                      group whose started completions have all resolved and that is still single-class
                      (plan_next_round); then, once every group is settled, the first round of drawn prompts
                      (prompts_needed -> draw_prompts -> plan_first_round)
        resolve(pid, correct)  one started completion of pid finished (True / False) or was left out (None)
        finish() -> {pid: (n_correct, n_total)} of every planned group; records them and ends the step

    A group is settled when it is mixed (no later completion can unmix it) or has nothing outstanding after its
    extension was decided. The decisions are AdaptiveScheduler's, taken on the same (n_correct, n_total) as a
    round-based loop takes them, so the same completions give the same groups and draws; only when they are
    taken differs. Fed a whole round at a time (every requests() batch resolved before the next requests()),
    this is exactly the round-based schedule. Counters: `extra_rounds` counts plan_next_round calls that added
    samples (a streaming step makes one per batch of groups that resolve together, not one per round)."""

    def __init__(self, scheduler: AdaptiveScheduler, prompt_ids: List[Hashable],
                 draw_prompts: Optional[Callable[[int], List[Hashable]]] = None):
        self.scheduler, self.draw_prompts = scheduler, draw_prompts
        self.base_prompts = self.drawn = len(prompt_ids)
        self.state: Dict[Hashable, Tuple[int, int]] = {}        # resolved (n_correct, n_total) per planned group
        self.outstanding: Dict[Hashable, int] = {}              # started, not yet resolved
        self._ready: List[Hashable] = []                        # groups whose outstanding count just reached 0
        self._new = scheduler.plan_first_round(prompt_ids)
        self._finished = False

    def _mixed(self, pid) -> bool:
        c, n = self.state.get(pid, (0, 0))
        return 0 < c < n

    def _start(self, plan: Mapping[Hashable, int]) -> Dict[Hashable, int]:
        for pid, n in plan.items():
            self.outstanding[pid] = self.outstanding.get(pid, 0) + n
        return dict(plan)

    def requests(self) -> Dict[Hashable, int]:
        """The samples to start now (empty: wait for more resolve() calls, or the step is done)."""
        if self._finished:
            raise RuntimeError("StepSchedule.requests() after finish()")
        plan, self._new = dict(self._new), {}
        if self._ready:
            extra = self.scheduler.plan_next_round({p: self.state.get(p, (0, 0)) for p in self._ready})
            self._ready = []
            for pid, n in extra.items():
                plan[pid] = plan.get(pid, 0) + n
        while not plan and self.draw_prompts is not None and self.settled:
            mixed = sum(1 for p in self.state if self._mixed(p))
            extra = self.scheduler.prompts_needed(mixed, self.drawn, self.base_prompts)
            new = self.draw_prompts(extra) if extra else []
            if not new:
                self.draw_prompts = None                        # as a round-based loop: no more draws this step
                break
            self.drawn += len(new)
            plan = self.scheduler.plan_first_round(new)
        return self._start(plan)

    def resolve(self, pid: Hashable, correct: Optional[bool]) -> None:
        left = self.outstanding.get(pid, 0)
        if left < 1:
            raise ValueError(f"group {pid!r}: a completion resolved that was never started")
        self.outstanding[pid] = left - 1
        if correct is not None:
            c, n = self.state.get(pid, (0, 0))
            self.state[pid] = (c + bool(correct), n + 1)
        if left == 1:
            self._ready.append(pid)

    @property
    def settled(self) -> bool:
        """No group can still change from single-class to mixed (and nothing waits to be decided)."""
        return not self._new and not self._ready and all(
            left == 0 or self._mixed(pid) for pid, left in self.outstanding.items())

    def finish(self) -> Dict[Hashable, Tuple[int, int]]:
        if any(self.outstanding.values()):
            raise RuntimeError(f"StepSchedule.finish() with {sum(self.outstanding.values())} completions outstanding")
        planned = {pid: self.state.get(pid, (0, 0)) for pid in self.outstanding}
        for pid, (c, n) in planned.items():
            self.scheduler.record(pid, c, n)
        self.scheduler.end_step()
        self._finished = True
        return planned
