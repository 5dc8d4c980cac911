"""Streaming rollouts (collect.collect_groups): the same decisions as rounds, early stop that never stops a
selectable sample, token accounting that adds up. Scheduling logic on a scripted engine (outcomes enumerable),
then the same path on the real vLLM engine with the tiny model."""
import random
from types import SimpleNamespace

import pytest
import torch

from megatron_bppo.algorithms import AdaptiveScheduler, get_selector, unselectable_running
from megatron_bppo.collect import collect_groups
from megatron_bppo.config import ConfigError, SamplingConfig, load_config
from megatron_bppo.testing.rewards import even_length
from megatron_bppo.testing.scripted_engine import ScriptedEngine, hashed_outcome
from conftest import load_script


def rendered(i: int, p: float):
    """A rendered prompt whose first token encodes its success probability (read by the scripted outcome)."""
    return SimpleNamespace(example=SimpleNamespace(id=f"p{i}", reference=""), token_ids=[int(p * 100), i])


def p_of(prompt_ids):
    return prompt_ids[0] / 100


def make_prompts(n, seed):
    rng = random.Random(seed)
    return [rendered(i, rng.choice([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])) for i in range(n)]


def scheduler(**kw):
    return AdaptiveScheduler(**{"n_init": 4, "g_max": 12, "n_step": 4, "skip_after": 1, "target_pairs": 10,
                                "max_prompt_draw_factor": 3.0, **kw})


def run(engine, sched, prompts, pool, streaming=True, early_stop="off", seed=11, stop=None):
    drawn = iter(pool or [])
    draw = (lambda n: [p for _, p in zip(range(n), drawn)]) if pool is not None else None
    return collect_groups(engine, sched, prompts, SamplingConfig(), even_length, {}, seed=seed, draw_more=draw,
                          streaming=streaming, early_stop=early_stop, stop=stop)


def summary(result):
    return [(g.prompt_id, [len(c.token_ids) for c in g.completions], g.correct, [c.sample_index for c in g.completions])
            for g in result.groups]


@pytest.mark.parametrize("max_num_seqs", [1000, 16])
def test_stream_makes_the_same_decisions_as_rounds(max_num_seqs):
    """Same seeds -> same samples; the schedule must then give the same groups, draws and scheduler state over
    several steps (history-based skipping included), however the stream interleaves them."""
    engine = ScriptedEngine(hashed_outcome(p_of), max_num_seqs=max_num_seqs)
    states, results = [], []
    for streaming in (False, True):
        sched, out = scheduler(), []
        for step in range(4):
            prompts = make_prompts(12, step % 2)        # prompts recur: skipping comes into play
            pool = [rendered(100 + 20 * step + i, p.token_ids[0] / 100) for i, p in enumerate(make_prompts(20, 7))]
            out.append(run(engine, sched, prompts, pool, streaming, seed=step))
        states.append(sched.state_dict())
        results.append(out)
    rounds, stream = results
    assert [summary(r) for r in rounds] == [summary(r) for r in stream]
    for a, b in zip(rounds, stream):
        ca, cb = dict(a.counters), dict(b.counters)
        ca.pop("extra_rounds"), cb.pop("extra_rounds")      # per batch of groups that resolve together
        assert ca == cb
    assert states[0]["history"] == states[1]["history"] and states[0]["offers"] == states[1]["offers"]
    total = {k: sum(r.counters[k] for r in rounds) for k in rounds[0].counters}
    for key in ("prompts_drawn_extra", "groups_rescued", "groups_exhausted", "prompts_skipped_unsolved"):
        assert total[key] > 0, key                             # every kind of decision was exercised
    for r in rounds + stream:
        assert all(idx == sorted(idx) and len(set(idx)) == len(idx) for _, _, _, idx in summary(r))


def test_stream_does_not_wait_for_the_slowest_sample():
    """A short single-class group gets its extra samples while a long group is still running: the stream ends
    before the two rounds would (rounds cost the longest sample of each round)."""
    lengths = {0: 5, 1: 40}         # prompt 0: short and always wrong -> extended; prompt 1: long, mixed

    def outcome(request):
        pid = request.prompt_token_ids[1]
        return (lengths[pid], False) if pid == 0 else (lengths[pid] - request.seed % 3, request.seed % 2 == 0)

    prompts = [rendered(0, 0.0), rendered(1, 0.5)]
    steps = {}
    for streaming in (False, True):
        engine = ScriptedEngine(outcome)
        result = run(engine, AdaptiveScheduler(n_init=4, g_max=8, n_step=4, skip_after=0), prompts, None,
                     streaming)
        steps[streaming] = engine.decode_steps
        assert [len(g.completions) for g in result.groups] == [8, 4]
    assert steps[True] <= 40 < steps[False] == 40 + 5


def _selected(result):
    out = []
    for g in result.groups:
        c = torch.tensor([g.correct])
        n = torch.tensor([[len(x.token_ids) for x in g.completions]])
        mask = get_selector("binary")(c, n, torch.zeros_like(n, dtype=torch.float), torch.ones_like(c)).mask[0]
        out.append((g.prompt_id, sorted(g.completions[i].sample_index for i in range(len(g.completions))
                                        if mask[i])))
    return out


@pytest.mark.parametrize("policy", ["as_incorrect", "exclude"])
def test_early_stop_keeps_the_selected_pair_and_accounts_every_token(policy):
    engine = ScriptedEngine(hashed_outcome(p_of, max_len=60), max_num_seqs=24)
    prompts = make_prompts(16, 3)
    exact = run(engine, scheduler(target_pairs=None), prompts, None, early_stop="off")
    cut = run(engine, scheduler(target_pairs=None), prompts, None, early_stop=policy)
    assert _selected(exact) == _selected(cut)                  # the pair BPPO trains on is the same
    assert cut.stopped_samples > 0 and cut.stopped_tokens > 0 and exact.stopped_samples == 0
    assert cut.generated_tokens < exact.generated_tokens
    kept = {g.prompt_id: g for g in cut.groups}
    finished = sum(len(c.token_ids) for g in cut.groups for c in g.completions if c.finish_reason != "abort")
    assert cut.generated_tokens == finished + cut.stopped_tokens
    assert exact.generated_tokens == sum(len(c.token_ids) for g in exact.groups for c in g.completions)
    for g in exact.groups:
        n_cut = len(kept[g.prompt_id].completions)
        if policy == "as_incorrect":                           # every sample stays, stopped ones count wrong
            assert n_cut == len(g.completions)
            for a, b, ok in zip(g.completions, kept[g.prompt_id].completions, kept[g.prompt_id].correct):
                assert b.finish_reason != "abort" or (not ok and len(b.token_ids) < len(a.token_ids))
        else:
            assert n_cut <= len(g.completions)
    if policy == "exclude":
        assert sum(len(g.completions) for g in exact.groups) - sum(len(g.completions) for g in cut.groups) \
            == cut.stopped_samples


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_abandons_the_rollout_at_the_next_engine_step(streaming):
    """A stop signal mid-rollout (trainer.StopRequest.requested) ends it after the engine step in progress: no
    groups, no outcome recorded in the sampling schedule, the stream closed; a check that never says stop changes
    nothing."""
    engine = ScriptedEngine(hashed_outcome(p_of), max_num_seqs=16)
    prompts, pool = make_prompts(12, 0), [rendered(100 + i, 0.3) for i in range(20)]
    full = run(engine, scheduler(), prompts, pool, streaming)
    never = run(engine, scheduler(), prompts, pool, streaming, stop=lambda: False)
    assert not full.interrupted and full.engine_steps > 2 and full.groups
    assert summary(never) == summary(full) and never.engine_steps == full.engine_steps and not never.interrupted
    asked, streams, closed = [], [], []

    def stop():
        asked.append(len(asked))
        return len(asked) == 2

    def stream(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        streams[-1].close = lambda: closed.append(True)
        return streams[-1]

    sched, real_stream = scheduler(), engine.stream
    before = sched.state_dict()
    engine.stream = stream
    cut = run(engine, sched, prompts, pool, streaming, stop=stop)
    assert cut.interrupted and cut.groups == [] and cut.engine_steps == 2 == len(asked)
    assert sched.state_dict()["history"] == before["history"]      # no outcome recorded (the trainer saves the
                                                                   # schedule's pre-step snapshot anyway)
    if streaming:                                   # closed with samples still running
        assert len(streams) == 1 and closed == [True] and streams[0].outstanding


def test_unselectable_running_bound():
    finished = [(10, True), (14, False), (30, True)]
    assert unselectable_running(finished, {"a": 14, "b": 15, "c": 3}) == ["b"]      # > max(10, 14) only
    assert unselectable_running([(10, True)], {"a": 99}) == []                      # one class only: wait
    assert unselectable_running([], {"a": 99}) == []


def test_early_stop_config_errors():
    with pytest.raises(ConfigError, match="selector is 'all'.*set algorithm.early_stop=off"):
        load_config(None, ["algorithm.name=grpo", "algorithm.early_stop=exclude"])
    for bad in ("rollout.schedule=rounds", "rollout.backend=hf"):
        with pytest.raises(ConfigError, match="set rollout.schedule=stream and rollout.backend=vllm"):
            load_config(None, ["algorithm.early_stop=exclude", bad])
    with pytest.raises(ConfigError, match="algorithm.early_stop='sometimes': must be one of off"):
        load_config(None, ["algorithm.early_stop=sometimes"])
    assert load_config(None, ["algorithm.early_stop=as_incorrect"]).rollout.schedule == "stream"


def test_early_stop_replay_matches_the_stop_run():
    """bench/early_stop_replay.py on a group of the head-to-head's seed 1, step 2 (weights still identical in both
    runs): lengths [39, 106, 102, 243], correct [T, F, F, T]. The stop run stopped samples 1 and 3 and trained the
    pair (0, 2) with A+ 1.732 and A- -0.577 (as_incorrect); without early stop it got +1 / -1."""
    replay = load_script("bench/early_stop_replay.py")
    algo = {"n_init": 4, "advantage": "grpo", "adv_eps": 1e-6, "pair_weighting": "none"}
    group = {"correct": [True, False, False, True], "rewards": [1.0, 0.0, 0.0, 1.0],
             "completions": [[7] * n for n in (39, 106, 102, 243)]}
    out, lengths, stopped, n = replay.replay_group(group, algo)
    assert (lengths, stopped, n) == ((39, 102), 2, 4)
    assert out["off"][:2] == pytest.approx((1.0, -1.0), abs=1e-5)
    assert out["as_incorrect"][:2] == pytest.approx((3 ** 0.5, -(1 / 3) ** 0.5), abs=1e-5)
    assert out["exclude"][:2] == pytest.approx((1.0, -1.0), abs=1e-5)        # two samples left, one of each class
    assert [p for _, _, p in out.values()] == pytest.approx([0.5, 0.25, 0.5])
    # an extended group (8 > n_init): its first round was single-class and finished; only extra samples stop
    group = {"correct": [False] * 4 + [True, False, False, True], "rewards": [0.0] * 4 + [1.0, 0.0, 0.0, 1.0],
             "completions": [[7] * n for n in (300, 250, 240, 230, 50, 60, 70, 80)]}
    out, lengths, stopped, _ = replay.replay_group(group, algo)
    assert (lengths, stopped) == ((50, 60), 2)                  # samples 6 and 7, not the long first round
    assert replay.replay_group({"correct": [True] * 3, "rewards": [1.0] * 3, "completions": [[1]] * 3}, algo) is None
