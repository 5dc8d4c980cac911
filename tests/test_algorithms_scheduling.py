"""Adaptive completion scheduling: rounds, skipping, retries, extra prompts, counters, determinism, resume."""
import json
import random

import pytest

from megatron_bppo.algorithms import SCHEDULER_COUNTERS, AdaptiveScheduler, StepSchedule


def test_fixed_is_plain_grpo():
    s = AdaptiveScheduler.fixed(8)
    assert s.plan_first_round([1, 2, 3]) == {1: 8, 2: 8, 3: 8}
    assert s.plan_next_round({1: (0, 8), 2: (8, 8), 3: (3, 8)}) == {}
    for _ in range(5):
        for p in (1, 2, 3):
            s.record(p, 8, 8)
        s.end_step()
    assert s.plan_first_round([1, 2, 3]) == {1: 8, 2: 8, 3: 8}  # never skips


def test_rounds_only_for_single_class_groups_up_to_gmax():
    s = AdaptiveScheduler(n_init=4, g_max=10, n_step=4)
    assert s.plan_first_round(["a", "b", "c", "d"]) == {p: 4 for p in "abcd"}
    assert s.plan_next_round({"a": (0, 4), "b": (4, 4), "c": (2, 4), "d": (0, 0)}) == {"a": 4, "b": 4}
    assert s.plan_next_round({"a": (0, 8), "b": (5, 8)}) == {"a": 2}
    assert s.plan_next_round({"a": (0, 10)}) == {}
    s.record("a", 0, 10), s.record("b", 5, 8), s.record("c", 2, 4)
    c = s.end_step()
    assert c["extra_rounds"] == 2 and c["extra_samples"] == 10 and c["groups_extended"] == 2
    assert c["groups_rescued"] == 1 and c["groups_exhausted"] == 1
    assert c["groups_mixed"] == 2 and c["groups_all_wrong"] == 1 and c["first_round_samples"] == 16
    with pytest.raises(ValueError, match="n_correct"):
        s.plan_next_round({"a": (5, 4)})


def _observe(s, pid, nc, nt, steps):
    for _ in range(steps):
        s.plan_first_round([pid])
        s.record(pid, nc, nt)
        s.end_step()


def test_skip_solved_unsolved_and_cooldown():
    s = AdaptiveScheduler(n_init=2, g_max=2, skip_after=2, skip_cooldown=3)
    _observe(s, "easy", 2, 2, 2)
    _observe(s, "hard", 0, 2, 1)
    _observe(s, "mixed", 1, 2, 2)
    assert s.plan_first_round(["easy", "hard", "mixed"]) == {"hard": 2, "mixed": 2}
    s.record("hard", 0, 2)
    s.end_step()
    plans = [s.plan_first_round(["easy", "hard"]) for _ in range(4)]
    # "easy": skipped 3 offers (1 before + 2 here) -> its 4th offer is a retry, its history is unchanged
    # (nothing recorded) so the 5th is skipped again; "hard" retries one offer later
    assert plans == [{}, {}, {"easy": 2}, {"hard": 2}]
    c = s.counters
    assert c["prompts_skipped_solved"] == 4 and c["prompts_skipped_unsolved"] == 3 and c["prompts_retried"] == 2
    # a retried prompt that is still uniform is skipped again at its next offer
    s.record("easy", 2, 2)
    assert s.plan_first_round(["easy"]) == {}
    s.record("easy", 1, 2)  # now mixed: no streak any more
    assert s.plan_first_round(["easy"]) == {"easy": 2}


def test_skip_disabled_and_history_window():
    s = AdaptiveScheduler(skip_after=0, history_window=3)
    _observe(s, 1, 8, 8, 5)
    assert s.plan_first_round([1]) == {1: 8}
    assert list(s.history[1]) == [1.0, 1.0, 1.0]


def test_retry_probability_is_deterministic_by_seed():
    def plans(seed):
        s = AdaptiveScheduler(skip_after=1, skip_cooldown=None, retry_prob=0.5, seed=seed)
        ids = list(range(200))
        for p in ids:
            s.record(p, 0, 8)
        return [sorted(s.plan_first_round(ids)) for _ in range(3)]

    a, b, c = plans(0), plans(0), plans(1)
    assert a == b and a != c
    assert 60 < len(a[0]) < 140  # about half retried
    never = AdaptiveScheduler(skip_after=1, skip_cooldown=None)
    never.record(0, 0, 8)
    assert all(never.plan_first_round([0]) == {} for _ in range(20))


def test_the_trainer_schedule_takes_retry_and_draw_settings_from_the_config():
    """collect.sampling_schedule: algorithm.retry_prob (drawn with sampling.seed), algorithm.min_mixed_rate."""
    from megatron_bppo.collect import sampling_schedule
    from megatron_bppo.config import load_config

    def schedule(*overrides, seed=0):
        cfg = load_config(None, ["algorithm.skip_after=1", "algorithm.skip_cooldown=100", "algorithm.target_pairs=4",
                                 "data.prompts_per_step=4", "data.train_size=64", *overrides])
        s = sampling_schedule(cfg.algorithm, seed)
        for p in range(200):
            s.record(p, 0, 4)
        return s

    assert schedule().plan_first_round(range(200)) == {}                     # default retry_prob 0: all skipped
    assert len(schedule("algorithm.retry_prob=1").plan_first_round(range(200))) == 200
    half = [sorted(schedule("algorithm.retry_prob=0.5", seed=seed).plan_first_round(range(200))) for seed in (3, 3, 4)]
    assert half[0] == half[1] != half[2] and 60 < len(half[0]) < 140
    # no mixed group yet: rate = min_mixed_rate -> ceil(4 / rate), within the 2 x 4 budget less the 4 drawn
    assert schedule().prompts_needed(0, 4, 4) == 4                           # 40 wanted, the budget caps it
    assert schedule("algorithm.min_mixed_rate=1", "algorithm.max_prompt_draw_factor=4").prompts_needed(0, 4, 4) == 4
    assert schedule("algorithm.min_mixed_rate=0.5", "algorithm.max_prompt_draw_factor=4").prompts_needed(0, 4, 4) == 8


def test_prompts_needed():
    s = AdaptiveScheduler(target_pairs=16, max_prompt_draw_factor=2.0, min_mixed_rate=0.1)
    assert s.prompts_needed(16, 32, 32) == 0
    assert s.prompts_needed(8, 32, 32) == 32  # rate 1/4 -> 8 / 0.25 = 32, budget 64 - 32 = 32
    assert s.prompts_needed(12, 32, 32) == 11  # rate 0.375 -> ceil(4 / 0.375)
    assert s.prompts_needed(0, 32, 32) == 32  # no rate yet: floor 0.1 -> 160, capped by the budget
    assert s.prompts_needed(8, 64, 32) == 0   # budget spent
    assert AdaptiveScheduler().prompts_needed(0, 32, 32) == 0  # target_pairs None: off
    assert s.counters["prompts_drawn_extra"] == 75


def _simulator(seed):
    """Each prompt has a fixed success probability; sampling is seeded per (prompt, call)."""
    rng = random.Random(seed)
    p = {i: rng.choice([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]) for i in range(1000)}
    calls = {"n": 0}

    def sample(plan):
        calls["n"] += 1
        r = random.Random(seed * 7919 + calls["n"])
        return {pid: (sum(r.random() < p[pid] for _ in range(n)), n) for pid, n in sorted(plan.items())}

    return sample


def run_rounds(s, prompt_ids, sample, draw=None):
    """StepSchedule fed a whole round at a time: sample({pid: n}) -> {pid: (n_correct, n)}."""
    plan = StepSchedule(s, prompt_ids, draw)
    requested = plan.requests()
    while requested:
        for pid, (c, n) in sample(requested).items():
            for i in range(n):
                plan.resolve(pid, i < c)
        requested = plan.requests()
    return plan.finish()


def _run(s, steps, seed=3, start=0):
    sample = _simulator(seed)
    nxt = {"i": start + 16 * steps}
    out = []

    def draw(n):
        ids = list(range(nxt["i"], min(nxt["i"] + n, 1000)))
        nxt["i"] += len(ids)
        return ids

    for t in range(steps):
        out.append(run_rounds(s, list(range(16 * (t % 4), 16 * (t % 4) + 16)), sample, draw))
    return out


def test_step_schedule_counters_consistent():
    s = AdaptiveScheduler(n_init=4, g_max=12, n_step=4, skip_after=1, target_pairs=8, max_prompt_draw_factor=3.0)
    states = _run(s, 6)
    c = s.counters
    total = sum(n for st in states for _, n in st.values())
    assert total == c["first_round_samples"] + c["extra_samples"]
    assert c["prompts_offered"] == c["prompts_planned"] + c["prompts_skipped_solved"] + c["prompts_skipped_unsolved"]
    assert c["groups_recorded"] == c["groups_mixed"] + c["groups_all_correct"] + c["groups_all_wrong"]
    assert c["groups_extended"] == c["groups_rescued"] + c["groups_exhausted"]
    assert c["steps"] == 6 and c["prompts_skipped_solved"] + c["prompts_skipped_unsolved"] > 0
    assert c["prompts_drawn_extra"] > 0 and c["groups_rescued"] > 0
    assert all(n <= 12 for st in states for _, n in st.values())
    assert set(SCHEDULER_COUNTERS) == set(c)


def test_determinism_and_state_dict_round_trip():
    kw = dict(n_init=4, g_max=12, skip_after=1, skip_cooldown=2, retry_prob=0.3, target_pairs=8, seed=5)
    a = AdaptiveScheduler(**kw)
    _run(a, 3)
    state = json.loads(json.dumps(a.state_dict()))
    b = AdaptiveScheduler(**kw)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    ra, rb = _run(a, 3, seed=9), _run(b, 3, seed=9)
    assert ra == rb and a.counters == b.counters and a.state_dict() == b.state_dict()
    c = AdaptiveScheduler(**kw)
    _run(c, 3)
    assert _run(c, 3, seed=9) == ra
    with pytest.raises(ValueError, match="missing"):
        AdaptiveScheduler().load_state_dict({"history": []})


@pytest.mark.parametrize("kw, field", [
    (dict(n_init=0), "n_init"), (dict(n_init=8, g_max=4), "g_max"), (dict(n_step=0), "n_step"),
    (dict(skip_after=-1), "skip_after"), (dict(skip_after=5, history_window=4), "history_window"),
    (dict(skip_cooldown=0), "skip_cooldown"), (dict(retry_prob=1.5), "retry_prob"),
    (dict(target_pairs=0), "target_pairs"), (dict(max_prompt_draw_factor=0.5), "max_prompt_draw_factor"),
    (dict(min_mixed_rate=0.0), "min_mixed_rate"),
])
def test_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveScheduler(**kw)


def test_misuse():
    s = AdaptiveScheduler()
    with pytest.raises(ValueError, match="duplicate"):
        s.plan_first_round([1, 1])
    with pytest.raises(ValueError, match="n_correct"):
        s.record(1, 3, 2)
    s.record(1, 0, 0)  # empty group: ignored
    assert 1 not in s.history
