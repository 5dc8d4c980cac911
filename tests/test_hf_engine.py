"""The transformers rollout engine (rollout.backend=hf) against the vLLM engine on CPU, on the tiny checkpoints.

One worker process (this file run as a script: `python tests/test_hf_engine.py --hf H --ref R --out J`) starts
both engines at world size 1 on the same weights and records: score() log-probs, greedy tokens / text / finish,
the log-probs of each engine's samples under the other's teacher-forced scoring (T=1, and T=0.7 with top-p 0.9:
vLLM's processed_logprobs), stop strings / stop token ids / EOS / ignore_eos, and both engines after the same
weight stream (a second checkpoint, and one that makes EOS likely) against the reference HF model. vLLM runs in
its own process because it changes process-wide state (global RNG seeds, gc.freeze, torch.set_num_threads).
The HF-only tests (seeding, batch independence, weight-stream errors, sleep/wake rules) run in-process, and one
2-step trainer run at world size 1 uses rollout.backend=hf end to end.

Tolerances (fp32 everywhere; measured on this machine's CPU, then about 10x as margin): the two engines'
log-probs differ by reduction order only (vLLM's oneDNN-packed GEMMs and CPU attention vs torch matmul / SDPA):
max |d| measured 9.5e-7 for score(), 1.4e-6 for greedy and for T=0.7 / top-p 0.9 samples, 1.9e-6 after a weight
update, so CROSS_TOL = 2e-5; the HF engine's decode-loop log-probs vs its own teacher-forced scoring (KV-cached,
left-padded, shared prefill vs one full forward) and vs the reference HF model: 9.5e-7, so SELF_TOL = 1e-5.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo.config import RolloutConfig, SamplingConfig  # noqa: E402
from megatron_bppo.testing.learner_checks import fixed_sequences  # noqa: E402

MAX_LEN = 128
PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 300, 9], [1, 55, 66, 77, 88, 99, 111], [1, 5]]
CROSS_TOL = 2e-5            # HF engine vs vLLM engine (see the module docstring)
SELF_TOL = 1e-5             # HF engine: decode loop vs teacher-forced
T, TOP_P = 0.7, 0.9


def fixed_token_lists(vocab: int) -> list[list[int]]:
    return [s.tolist() for s in fixed_sequences(vocab)]


def max_diff(a, b) -> float:
    return max(float((torch.as_tensor(x).double() - torch.as_tensor(y).double()).abs().max()) for x, y in zip(a, b))


def response_logprobs(engine_lp, flat):
    """Teacher-forced log-probs of full sequences -> those of the response tokens only."""
    return [lp[len(PROMPTS[c.prompt_index]) - 1:] for lp, c in zip(engine_lp, flat)]


def hf_config_kwargs(**kw):
    return RolloutConfig(backend="hf", max_model_len=MAX_LEN, max_num_seqs=16, **kw)


# ------------------------------------------------------------------------------------------------ the worker
def worker(hf_dir: str, ref_dir: str, out: str):
    from transformers import AutoModelForCausalLM

    from megatron_bppo.rollout import HFEngine, VLLMEngine

    vllm = VLLMEngine(hf_dir, RolloutConfig(max_model_len=MAX_LEN, max_num_seqs=16, kv_cache_memory_bytes=16 << 20))
    hf = HFEngine(hf_dir, hf_config_kwargs())
    engines = {"vllm": vllm, "hf": hf}
    vocab = hf.vocab_size
    seqs = fixed_token_lists(vocab)
    r = {}

    def both(fn):
        return {name: fn(e) for name, e in engines.items()}

    # score() at T=1
    scores = both(lambda e: e.score(seqs))
    r["score_diff"] = max_diff(scores["vllm"], scores["hf"])

    # greedy: tokens, text, finish, log-probs (T=1)
    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    g = both(lambda e: e.generate(PROMPTS, 1, greedy))
    r["greedy_tokens"] = {k: [c[0].token_ids for c in v] for k, v in g.items()}
    r["greedy_text"] = {k: [c[0].text for c in v] for k, v in g.items()}
    r["greedy_finish"] = {k: [c[0].finish_reason for c in v] for k, v in g.items()}
    r["greedy_logprob_diff"] = max_diff([c[0].logprobs for c in g["vllm"]], [c[0].logprobs for c in g["hf"]])

    # samples of each engine, scored teacher-forced by the other (T=1), and at T=0.7 / top-p 0.9 (processed)
    for label, temperature, top_p in (("T1", 1.0, 1.0), ("T0.7_p0.9", T, TOP_P)):
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=12, seed=11)
        for sampler in ("hf", "vllm"):
            flat = [c for group in engines[sampler].generate(PROMPTS, [2, 1, 3, 0], sampling) for c in group]
            full = [PROMPTS[c.prompt_index] + c.token_ids for c in flat]
            sampled = [c.logprobs for c in flat]
            record = r[f"{sampler}_samples_{label}"] = {"tokens": sum(len(c.token_ids) for c in flat)}
            # the HF engine's teacher-forced log-probs at the sampling setting (processed_logprobs)
            key = "diff_vs_own_scoring" if sampler == "hf" else "diff_vs_hf"
            record[key] = max_diff(sampled, response_logprobs(hf.token_logprobs(full, temperature, top_p), flat))
            if sampler == "hf" and temperature == 1.0:   # vLLM scores at T=1 only (prompt log-probs are raw)
                record["diff_vs_vllm"] = max_diff(sampled, response_logprobs(vllm.score(full), flat))

    # stops, compared token for token on greedy runs (greedy makes both engines produce the same tokens)
    text1, tokens2 = r["greedy_text"]["hf"][1], r["greedy_tokens"]["hf"][2]
    stop_string = next(text1[i:i + 2] for i in range(2, len(text1) - 1)
                       if "\ufffd" not in text1[i:i + 2] and text1[i:i + 2].strip())
    stop_token = tokens2[4]
    cases = {"stop_string": SamplingConfig(temperature=0.0, max_tokens=16, stop=[stop_string, "\u2603never"]),
             "stop_token": SamplingConfig(temperature=0.0, max_tokens=16, stop=[stop_token]),
             "max_tokens": SamplingConfig(temperature=0.0, max_tokens=5)}
    r["stop_string"], r["stop_token"] = stop_string, stop_token

    def outcome(e, sampling):
        return [[c[0].token_ids, c[0].text, c[0].finish_reason] for c in e.generate(PROMPTS, 1, sampling)]

    r["stops"] = {name: both(lambda e: outcome(e, s)) for name, s in cases.items()}

    # weights: the same stream into both engines -> both equal the reference model; outputs changed
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_lp = [torch.log_softmax(reference(torch.tensor([s])).logits[0, :-1], -1)
                  .gather(1, torch.tensor(s[1:]).unsqueeze(1)).squeeze(1) for s in seqs]
    stats = both(lambda e: e.update_weights(iter(reference.state_dict().items())).as_dict())
    r["update_tensors"] = {k: v["tensors"] for k, v in stats.items()}
    after = both(lambda e: e.score(seqs))
    r["update_changed"] = max_diff(after["hf"], scores["hf"])
    r["update_vs_reference"] = {k: max_diff(v, ref_lp) for k, v in after.items()}
    r["update_cross"] = max_diff(after["hf"], after["vllm"])
    r["greedy_after_update_equal"] = (outcome(hf, greedy) == outcome(vllm, greedy))

    # EOS: a stream whose EOS row copies (x1.5) the lm_head row of prompt 0's first greedy token
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    first = outcome(hf, greedy)[0][0][0]
    eos = sorted(hf.eos_token_ids)[0]
    state["lm_head.weight"][eos] = 1.5 * state["lm_head.weight"][first]
    both(lambda e: e.update_weights(iter(state.items())))
    r["eos"] = eos
    r["stops"]["eos"] = both(lambda e: outcome(e, greedy))
    r["stops"]["ignore_eos"] = both(lambda e: outcome(e, SamplingConfig(temperature=0.0, max_tokens=8,
                                                                         ignore_eos=True)))
    vllm.close()
    hf.close()
    with open(out, "w") as f:
        json.dump(r, f, indent=2)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_qwen2_other(models_dir):
    """The same architecture with other random weights: the weight stream of the update tests."""
    from megatron_bppo.testing.tiny_models import make_tiny_checkpoint

    return str(make_tiny_checkpoint(models_dir / "qwen2-untied-seed1", arch="qwen2", seed=1))


@pytest.fixture(scope="module")
def cross(tiny_qwen2, tiny_qwen2_other, tmp_path_factory):
    from conftest import read_json, run_procs

    out = str(tmp_path_factory.mktemp("hf-engine") / "cross.json")
    run_procs([os.path.abspath(__file__), "--hf", tiny_qwen2, "--ref", tiny_qwen2_other, "--out", out],
              timeout=300)
    return read_json(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process tests: one torch thread, as run_procs gives every worker (2 threads thrash on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    from megatron_bppo.rollout import HFEngine

    e = HFEngine(tiny_qwen2, hf_config_kwargs())
    yield e
    e.close()


# ------------------------------------------------------------------------------------------------ vs vLLM
def test_score_agrees_with_vllm(cross):
    assert cross["score_diff"] < CROSS_TOL, cross["score_diff"]


def test_greedy_same_tokens_text_and_logprobs(cross):
    assert cross["greedy_tokens"]["hf"] == cross["greedy_tokens"]["vllm"]
    assert cross["greedy_text"]["hf"] == cross["greedy_text"]["vllm"]
    assert cross["greedy_finish"]["hf"] == cross["greedy_finish"]["vllm"]
    assert cross["greedy_logprob_diff"] < CROSS_TOL


@pytest.mark.parametrize("label", ["T1", "T0.7_p0.9"])
def test_sampled_logprobs_agree_with_the_other_engine(cross, label):
    """HF samples: their log-probs == vLLM's score (T=1) and the HF teacher-forced processed log-probs; vLLM
    samples at T=0.7 / top-p 0.9 (processed_logprobs): their log-probs == the HF engine's at the same setting."""
    hf, vl = cross[f"hf_samples_{label}"], cross[f"vllm_samples_{label}"]
    assert hf["tokens"] == vl["tokens"] == 6 * 12
    assert hf["diff_vs_own_scoring"] < SELF_TOL, hf
    if label == "T1":
        assert hf["diff_vs_vllm"] < CROSS_TOL, hf
    assert vl["diff_vs_hf"] < CROSS_TOL, vl


@pytest.mark.parametrize("case", ["stop_string", "stop_token", "max_tokens", "eos", "ignore_eos"])
def test_stops_match_vllm(cross, case):
    hf, vl = cross["stops"][case]["hf"], cross["stops"][case]["vllm"]
    assert hf == vl
    finishes = [f for _, _, f in hf]
    if case == "stop_string":
        assert "stop" in finishes and all(cross["stop_string"] not in text for _, text, _ in hf)
    elif case == "stop_token":
        assert any(t[-1] == cross["stop_token"] and f == "stop" for t, _, f in hf)
    elif case == "max_tokens":
        assert all(len(t) == 5 and f == "length" for t, _, f in hf)
    elif case == "eos":
        assert hf[0] == [[cross["eos"]], "", "stop"]          # EOS kept in token_ids, not in the text
    else:
        assert all(len(t) == 8 and f == "length" for t, _, f in hf) and cross["eos"] in hf[0][0]


def test_update_weights_follows_the_stream_like_vllm(cross):
    assert cross["update_tensors"]["hf"] == cross["update_tensors"]["vllm"]
    assert cross["update_changed"] > 0.1
    assert cross["update_vs_reference"]["hf"] < SELF_TOL, cross["update_vs_reference"]
    assert cross["update_vs_reference"]["vllm"] < CROSS_TOL, cross["update_vs_reference"]
    assert cross["update_cross"] < CROSS_TOL
    assert cross["greedy_after_update_equal"]


# ------------------------------------------------------------------------------------------------ HF alone
def test_seeded_samples_do_not_depend_on_the_batch(engine):
    """Sample s of prompt i uses engine_prompt_seed(seed, i) + s whatever else runs: other n, other batch size,
    another prompt at another index, run_requests with the same seeds."""
    from megatron_bppo.rollout.engine import SampleRequest
    from megatron_bppo.seeds import engine_prompt_seed

    sampling = SamplingConfig(temperature=1.0, max_tokens=10, seed=3)
    base = engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
    assert [[c.sample_index for c in g] for g in base] == [[0, 1], [0], [0, 1, 2], []]
    assert all(c.prompt_index == i for i, g in enumerate(base) for c in g)
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]       # noqa: E731
    again = engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
    assert tokens(again) == tokens(base)
    fewer = engine.generate(PROMPTS, [1, 0, 3, 2], sampling)
    assert fewer[0][0].token_ids == base[0][0].token_ids and tokens(fewer)[2] == tokens(base)[2]
    engine.cfg.max_num_seqs = 1                   # one row per decode batch
    try:
        single = engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
    finally:
        engine.cfg.max_num_seqs = 16
    assert tokens(single) == tokens(base)
    assert max_diff([c.logprobs for g in single for c in g], [c.logprobs for g in base for c in g]) < SELF_TOL
    other = engine.generate([[1, 9, 9, 9, 9, 9, 9, 9, 9], PROMPTS[1], PROMPTS[2]], [4, 1, 3], sampling)
    assert tokens(other)[1:] == tokens(base)[1:3]
    assert tokens(engine.generate(PROMPTS, 2, SamplingConfig(temperature=1.0, max_tokens=10, seed=4)))[0] != \
        tokens(base)[0]
    requests = [SampleRequest("a", 2, tuple(PROMPTS[2]), engine_prompt_seed(3, 2) + 1),     # the batch primitive
                SampleRequest("b", 0, tuple(PROMPTS[0]), engine_prompt_seed(3, 0))]
    out = engine.run_requests(requests, sampling)
    assert [c.token_ids for c in out] == [base[2][1].token_ids, base[0][0].token_ids]
    unseeded = SamplingConfig(temperature=1.0, max_tokens=10)
    assert tokens(engine.generate(PROMPTS, 2, unseeded)) != tokens(engine.generate(PROMPTS, 2, unseeded))


def test_replicas_split_groups_and_merge_to_the_single_replica_result(engine, monkeypatch):
    """World size 2 without processes: each replica draws its share (whole groups), the merged shares equal the
    world-1 result token for token (per-sample seeds do not depend on the replica)."""
    import megatron_bppo.rollout.hf_engine as hf_engine
    from megatron_bppo.rollout.engine import Completion
    from megatron_bppo.rollout.placement import ReplicaLayout

    sampling = SamplingConfig(temperature=1.0, max_tokens=8, seed=9)
    whole = engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
    shares: list[dict] = []
    def gather(local, layout):                               # this replica's share; placeholders for the rest
        shares.append(dict(local))
        return {k: local[k] if k in local else Completion(k, [], "", torch.zeros(0), "abort") for k in range(6)}

    monkeypatch.setattr(hf_engine, "gather", gather)
    single = engine.layout
    try:
        for rank in (0, 1):
            engine.layout = ReplicaLayout(rank=rank, world_size=2, engine_tp=1)
            engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
    finally:
        engine.layout = single
    assert all(shares) and not set(shares[0]) & set(shares[1])
    merged = {**shares[0], **shares[1]}
    assert sorted(merged) == list(range(6))                  # the 6 requests: (0,0) (0,1) (1,0) (2,0) (2,1) (2,2)
    flat = [c for g in whole for c in g]
    assert [merged[k].token_ids for k in range(6)] == [c.token_ids for c in flat]
    groups = {0: {0, 1}, 1: {2}, 2: {3, 4, 5}}
    assert all(g <= set(share) or not g & set(share) for share in shares for g in groups.values())


def test_raw_logprobs_mode_reports_temperature_1(engine):
    """rollout.logprobs_mode=raw_logprobs: sampled tokens' log-probs before temperature / top-p (vLLM's raw mode)."""
    sampling = SamplingConfig(temperature=T, top_p=TOP_P, max_tokens=8, seed=2)
    engine.cfg.logprobs_mode = "raw_logprobs"
    try:
        flat = [c for g in engine.generate(PROMPTS, 2, sampling) for c in g]
    finally:
        engine.cfg.logprobs_mode = "processed_logprobs"
    full = engine.score([PROMPTS[c.prompt_index] + c.token_ids for c in flat])
    assert max_diff([c.logprobs for c in flat], response_logprobs(full, flat)) < SELF_TOL
    processed = [c for g in engine.generate(PROMPTS, 2, sampling) for c in g]
    assert [c.token_ids for c in processed] == [c.token_ids for c in flat]      # the mode changes reports only
    assert max_diff([c.logprobs for c in processed], [c.logprobs for c in flat]) > 0.1


def test_weight_stream_errors_and_tied_embeddings(tiny_llama_tied):
    from transformers import AutoModelForCausalLM

    from megatron_bppo.rollout import HFEngine
    from megatron_bppo.rollout.engine import RolloutEngineError

    e = HFEngine(tiny_llama_tied, hf_config_kwargs(load_format="dummy"))
    with pytest.raises(RolloutEngineError, match="load_format=dummy"):
        e.generate(PROMPTS, 1, SamplingConfig(max_tokens=4))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_tied, dtype=torch.float32).eval()
    named = [(n, p.detach()) for n, p in reference.named_parameters()]          # tied: no lm_head.weight
    assert not any(n == "lm_head.weight" for n, _ in named)
    for stream, message in ((named[1:], "did not cover every engine parameter"),
                            (named + [("model.extra.weight", torch.zeros(1))], "model.extra.weight"),
                            ([(named[0][0], torch.zeros(3, 3))] + named[1:], "shape")):
        with pytest.raises(RolloutEngineError, match=message):
            e.update_weights(iter(stream))
        with pytest.raises(RolloutEngineError, match=r"last update_weights\(\) failed"):
            e.score([[1, 2, 3]])
    stats = e.update_weights(iter(named))
    assert stats.tensors == len(named) and stats.bytes == sum(t.numel() * 4 for _, t in named)
    seqs = fixed_token_lists(e.vocab_size)
    with torch.no_grad():
        expected = [torch.log_softmax(reference(torch.tensor([s])).logits[0, :-1], -1)
                    .gather(1, torch.tensor(s[1:]).unsqueeze(1)).squeeze(1) for s in seqs]
    assert max_diff(e.score(seqs), expected) < SELF_TOL
    e.update_weights(iter(named + [("lm_head.weight", named[0][1])]))       # the tied name is accepted too
    e.close()
    with pytest.raises(RolloutEngineError, match="closed"):
        e.score(seqs)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_state_rules(engine, tiny_qwen2, level):
    from transformers import AutoModelForCausalLM

    from megatron_bppo.rollout.engine import RolloutEngineError

    greedy = SamplingConfig(temperature=0.0, max_tokens=6)
    before = [g[0].token_ids for g in engine.generate(PROMPTS, 1, greedy)]
    engine.sleep(level)
    assert engine.is_sleeping
    with pytest.raises(RolloutEngineError, match="asleep"):
        engine.generate(PROMPTS, 1, greedy)
    with pytest.raises(RolloutEngineError, match=r"wake_up\(\['weights'\]\)"):
        engine.update_weights(iter([]))
    engine.wake_up(["weights"])
    assert engine.is_sleeping                                   # the KV cache tag still sleeps
    if level == 2:                                              # weights discarded: a sync must come first
        engine.wake_up()
        with pytest.raises(RolloutEngineError, match=r"sleep\(level=2\)"):
            engine.generate(PROMPTS, 1, greedy)
        engine.sleep(2)
        engine.wake_up(["weights"])
        reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
        engine.update_weights(iter(reference.state_dict().items()))
    engine.wake_up()
    assert not engine.is_sleeping
    assert [g[0].token_ids for g in engine.generate(PROMPTS, 1, greedy)] == before


def test_requests_refused_with_the_setting_named(engine):
    from megatron_bppo.errors import ConfigError
    from megatron_bppo.rollout.engine import RolloutEngineError

    with pytest.raises(RolloutEngineError, match=r"rollout.max_model_len=128.*at least 136"):
        engine.generate([[1] * 120], 1, SamplingConfig(max_tokens=16))
    with pytest.raises(ConfigError, match=r"rollout.tp=2 with rollout.backend=hf.*rollout.tp=1"):
        RolloutConfig(backend="hf", tp=2).validate()
    with pytest.raises(ConfigError, match=r"rollout.backend='sglang': must be one of vllm, hf"):
        RolloutConfig(backend="sglang").validate()


def test_open_engine_picks_the_backend(tiny_qwen2):
    from megatron_bppo.rollout import HFEngine, open_engine

    e = open_engine(hf_config_kwargs(), tiny_qwen2, dtype="float32")
    assert isinstance(e, HFEngine)
    e.close()


# ------------------------------------------------------------------------------------------------ trainer
def test_trainer_two_steps_with_the_hf_backend(tiny_qwen2, tmp_path):
    """2 steps, world size 1, rollout.backend=hf: the learner trains on what the HF engine sampled, and the
    engine's log-probs match the Megatron learner's after every sync (fp32, same temperature)."""
    from test_trainer import metrics, train

    run_dir = str(tmp_path / "hf")
    train(tiny_qwen2, run_dir, "rollout.backend=hf", "train.steps=2", "eval.at_start=false",
          "sampling.temperature=0.7", nproc=1)
    m = metrics(run_dir)
    assert sorted(m) == [1, 2]
    trained = [r for r in m.values() if "loss" in r]
    assert trained, m
    for record in trained:
        assert record["mismatch/logprob_abs_diff_max"] < CROSS_TOL, record
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["rollout"]["backend"] == "hf"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    worker(a.hf, a.ref, a.out)
