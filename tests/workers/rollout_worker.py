"""One torchrun launch, one engine per rank, many checks: run by tests/test_rollout.py.

    torchrun --nproc-per-node 2 rollout_worker.py --hf H --tp T --pp P [--engine-tp K] --out result.json
    python rollout_worker.py --mode start-failure --hf H --out result.json

Megatron learner at TP/PP from H; a vLLM engine on every rank started with *random* weights (load_format=dummy),
so only the weight sync can make the two agree. Rank 0 writes a JSON with: the refusal to sample before the
first sync, log-prob differences engine vs learner after the sync and after one optimizer step, sampled-token
mismatch, greedy engine vs HF greedy on the synced weights, sleep/wake/sync cycles, error messages, sync stats.
"""
import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron_bppo.testing.learner_checks import fixed_sequences  # noqa: E402
from megatron_bppo.config import (LearnerConfig, ModelConfig, OptimConfig, ParallelConfig,  # noqa: E402
                                  RolloutConfig, SamplingConfig)

PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 300, 9], [1, 55, 66, 77, 88, 99, 111], [1, 5]]
MAX_LEN = 64



def max_diff(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


def stream_checks(engine) -> dict:
    """collect_groups through engine.stream vs rounds (same per-sample seeds), and with early stop."""
    from types import SimpleNamespace

    from megatron_bppo.algorithms import AdaptiveScheduler, get_selector
    from megatron_bppo.collect import collect_groups
    from megatron_bppo.testing.rewards import even_length

    prompts = [SimpleNamespace(example=SimpleNamespace(id=f"q{i}", reference=""), token_ids=p)
               for i, p in enumerate(PROMPTS)]
    # a random model rarely emits EOS: stop tokens give varied lengths (what early stop acts on)
    sampling = SamplingConfig(temperature=1.0, max_tokens=24, stop=tuple(range(3, engine.vocab_size, 12)))

    def run(streaming, early_stop="off"):
        result = collect_groups(engine, AdaptiveScheduler(n_init=3, g_max=9, n_step=3, skip_after=0), prompts,
                                sampling, even_length, {}, seed=5, streaming=streaming, early_stop=early_stop)
        selected = []
        for g in result.groups:
            c = torch.tensor([g.correct])
            n = torch.tensor([[len(x.token_ids) for x in g.completions]])
            mask = get_selector("binary")(c, n, torch.zeros(n.shape), torch.ones_like(c)).mask[0]
            selected.append(sorted(g.completions[i].sample_index for i in range(len(g.completions)) if mask[i]))
        return result, [[c.token_ids for c in g.completions] for g in result.groups], selected

    def finished(result):
        return {(g.prompt_id, c.sample_index): c.token_ids for g in result.groups for c in g.completions
                if c.finish_reason != "abort"}

    def leaked_stream_error():
        """A stream left open with samples still running (24 tokens, no stop: more than one stream step; two groups,
        one on each replica there is): the prefix-cache reset before sleeping must refuse on every rank."""
        from megatron_bppo.rollout.engine import SampleRequest

        stream = engine.stream(SamplingConfig(temperature=1.0, max_tokens=24, ignore_eos=True), track_running=False)
        stream.add([SampleRequest((f"leak{i}", 0), f"leak{i}", tuple(PROMPTS[i]), 1) for i in range(2)])
        stream.step()
        error = error_of(engine.sleep)
        stream.close()
        engine.sleep()                  # closed: the reset succeeds (an error here fails the whole worker)
        return error

    rounds, rounds_tokens, rounds_selected = run(False)
    stream, stream_tokens, stream_selected = run(True)
    cut, _, cut_selected = run(True, "exclude")
    kept, full = finished(cut), finished(stream)
    return {"equal_to_rounds": stream_tokens == rounds_tokens, "rounds_engine_steps": rounds.engine_steps,
            "cut_finished_same_tokens": bool(kept) and all(full[k] == v for k, v in kept.items()),
            "leaked_stream_sleep_error": leaked_stream_error(),
            "stream_engine_steps": stream.engine_steps, "samples": sum(map(len, stream_tokens)),
            "generated": stream.generated_tokens, "cut_generated": cut.generated_tokens,
            "cut_stopped_tokens": cut.stopped_tokens, "cut_stopped_samples": cut.stopped_samples,
            "cut_same_pairs": cut_selected == stream_selected == rounds_selected,
            "cut_accounting": cut.generated_tokens == cut.stopped_tokens + sum(
                len(c.token_ids) for g in cut.groups for c in g.completions),
            "digest": [stream_tokens, [len(c.token_ids) for g in cut.groups for c in g.completions]]}


def start_failure(args):
    """Engine start that fails inside vLLM (KV cache larger than the machine) -> our explanation."""
    from megatron_bppo.rollout import VLLMEngine

    cfg = RolloutConfig(max_model_len=MAX_LEN, max_num_seqs=4, kv_cache_memory_bytes=1 << 50, load_format="dummy")
    result = {"start_failure": error_of(lambda: VLLMEngine(args.hf, cfg))}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine-tp", type=int, default=1)
    ap.add_argument("--mode", default="full")
    args = ap.parse_args()
    if args.mode == "start-failure":
        return start_failure(args)

    import torch.distributed as dist

    from megatron_bppo.distributed import destroy_distributed
    from megatron_bppo.learner import build_learner
    from megatron_bppo.rollout import VLLMEngine, logprob_mismatch
    from megatron_bppo.weight_sync import sync_weights

    launch, bridge, learner, _ = build_learner(ModelConfig(path=args.hf), ParallelConfig(tp=args.tp, pp=args.pp),
                                               OptimConfig(lr=1e-2),
                                               LearnerConfig(micro_batch_tokens=128, max_seq_len=MAX_LEN))
    rank0 = launch.rank == 0
    engine = VLLMEngine(args.hf, RolloutConfig(tp=args.engine_tp, max_model_len=MAX_LEN, max_num_seqs=8,
                                               kv_cache_memory_bytes=16 << 20, load_format="dummy", seed=0))
    models = learner.unwrapped_models()
    bucket = 64 << 10                       # small buckets: many bucket boundaries inside fused layers
    result = {"layout": [args.tp, args.pp, launch.world_size], "engine_tp": args.engine_tp,
              "replicas": engine.layout.replicas, "engine_start_s": engine.start_seconds}
    seqs = fixed_sequences(bridge.hf_config.vocab_size)

    # (a) random engine weights -> sync -> engine log-probs == learner log-probs
    learner0 = learner.compute_logprobs(seqs)
    result["dummy_weights_error"] = error_of(lambda: engine.score(seqs))
    stats = sync_weights(bridge, models, engine, bucket)
    result["sync"] = stats.as_dict()
    engine0 = engine.score(seqs)
    result["maxdiff_after_sync"] = max_diff(engine0, learner0)

    # sampled tokens: the engine's log-probs of its own samples vs the learner's, at two temperatures
    for temperature in (1.0, 0.7):
        sampling = SamplingConfig(temperature=temperature, max_tokens=12, seed=11)
        completions = engine.generate(PROMPTS, [2, 1, 3, 0], sampling)
        flat = [(PROMPTS[i], c) for i, group in enumerate(completions) for c in group]
        learner.temperature = temperature
        full = learner.compute_logprobs([torch.tensor(p + c.token_ids) for p, c in flat])
        learner.temperature = 1.0
        stats_t = logprob_mismatch([c.logprobs for _, c in flat],
                                   [lp[len(p) - 1:] for (p, _), lp in zip(flat, full)])  # response tokens only
        result[f"sampled_T{temperature}"] = stats_t
        if temperature == 1.0:
            result["n_per_prompt"] = [len(g) for g in completions]
            result["sample_indices"] = [[c.sample_index for c in g] for g in completions]
            result["prompt_indices_ok"] = all(c.prompt_index == i for i, g in enumerate(completions) for c in g)
            result["finish_reasons"] = sorted({c.finish_reason for g in completions for c in g})
            result["texts_are_str"] = all(isinstance(c.text, str) for g in completions for c in g)
            gathered = [None] * launch.world_size
            dist.all_gather_object(gathered, digest([[c.token_ids for c in g] for g in completions]))
            result["same_on_every_rank"] = len(set(gathered)) == 1

    # (a2) the streamed rollout (one continuous batch per replica) makes the same groups as rounds, on every rank
    streams = stream_checks(engine)
    gathered = [None] * launch.world_size
    dist.all_gather_object(gathered, digest(streams.pop("digest")))
    result["stream"] = dict(streams, same_on_every_rank=len(set(gathered)) == 1)

    # (b) one optimizer step, sync: the engine follows the learner
    total = sum(len(s) - 1 for s in seqs)

    def nll(logprobs, mb):
        mask = mb.target_mask.float()
        return -(logprobs * mask).sum() / total, {}

    learner.train_step(seqs, [{} for _ in seqs], nll)
    learner1 = learner.compute_logprobs(seqs)
    result["sync_after_step"] = sync_weights(bridge, models, engine, bucket).as_dict()
    engine1 = engine.score(seqs)
    result["maxdiff_after_step"] = max_diff(engine1, learner1)
    result["learner_step_change"] = max_diff(learner1, learner0)
    result["engine_step_change"] = max_diff(engine1, engine0)

    # (c) greedy from the engine == HF greedy on the same (synced) weights
    greedy = SamplingConfig(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine_greedy = [g[0].token_ids for g in engine.generate(PROMPTS, 1, greedy)]
    exported = dict(bridge.export_hf_weights(models))
    if rank0:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.hf), dtype=torch.float32).eval()
        hf.load_state_dict(exported, strict=not hf.config.tie_word_embeddings)
        with torch.no_grad():
            result["hf_greedy"] = [hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10,
                                               do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
        result["engine_greedy"] = engine_greedy
    del exported

    # (d) sleep / wake / sync cycles keep results identical
    seeded = SamplingConfig(temperature=1.0, max_tokens=8, seed=5)

    def snapshot():
        return {"greedy": [g[0].token_ids for g in engine.generate(PROMPTS, 1, greedy)],
                "sampled": [[c.token_ids for c in g] for g in engine.generate(PROMPTS, 2, seeded)],
                "score": [lp.tolist() for lp in engine.score(seqs)]}

    reference = snapshot()
    cycles = []
    for cycle in range(3):
        engine.sleep()
        if cycle == 0:
            result["asleep_error"] = error_of(lambda: engine.generate(PROMPTS, 1, greedy))
        sync_weights(bridge, models, engine, bucket)
        cycles.append(snapshot() == reference)
    result["cycles_identical"] = cycles
    engine.sleep()
    engine.wake_up()
    result["stale_weights_error"] = error_of(lambda: engine.generate(PROMPTS, 1, greedy))
    sync_weights(bridge, models, engine, bucket)

    # a weight stream that misses parameters is an error (vLLM alone would only log it and keep stale values)
    result["empty_update_error"] = error_of(lambda: engine.update_weights(iter([])))
    result["after_failed_update_error"] = error_of(lambda: engine.generate(PROMPTS, 1, greedy))
    sync_weights(bridge, models, engine, bucket)

    # (e) a request too long for the context: clear error before anything reaches vLLM
    result["too_long_error"] = error_of(lambda: engine.generate([[1] * 60], 1, SamplingConfig(max_tokens=10)))
    result["too_long_score_error"] = error_of(lambda: engine.score([[1] * MAX_LEN]))
    result["engine_still_works"] = [g[0].token_ids for g in engine.generate(PROMPTS, 1, greedy)] == engine_greedy

    engine.close()
    # Megatron's world survives the engine: one more collective
    probe = torch.ones(1)
    dist.all_reduce(probe)
    result["megatron_world_ok_after_close"] = float(probe) == launch.world_size
    if rank0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
