"""Learner cost on identical rollouts: one fixed rollout batch trained by GRPO and by BPPO (with and without the
prefix cut), measured side by side in one process.

    python bench/learner_cost.py [--group-sizes 8,16] [--prompts 8] [--max-tokens 128] [--repeats 2]
                                 [--out runs/bench/learner_cost]

Rollout (once, untimed): SmolLM2-135M-Instruct (fp32) in the in-process vLLM engine samples max(G) completions at
T=0.7 for `--prompts` generated arithmetic prompts (arithmetic:l0_l5_mix, rendered with the chat template by
megatron_bppo.data.prompts, as the trainer renders them), scored by the gsm8k reward. The batch for a smaller G is
the first G completions of each group (i.i.d. samples, so a valid G-sample draw). Each (G, variant) builds its
update batch from the same groups with build_update_batch:
    grpo          selector all, prefix full            (every completion, whole responses)
    bppo_full     selector binary, prefix full         (shortest correct + shortest wrong of each mixed group)
    bppo_prefix   selector binary, prefix ratio 0.5    (the same pair, first ceil(0.5 L) response tokens, floor
                                                        --prefix-min-tokens, default 1: the pure cut)
Timed (the learner phase of trainer.rl_step): batch.attach_logprobs (old log-probs, engine mismatch) +
Learner.train_step (clipped PG loss from batch.policy_loss_fn, optimizer step). Every timed run starts from the
same weights: a fresh Learner is built from the HF dir (learner.build_learner) before it, outside the timed
region. Repeats are interleaved over variants (repeat 1 of every variant, then repeat 2, ...) so drifting
background load hits every variant alike; the min is reported. Reported: time, tokens through the learner
(prompt + kept response tokens of the trained sequences), padded tokens (micro-batch rows x longest), selected
sequences, ratios vs GRPO, and efficiency = time ratio / token ratio (1.0: the speed-up equals the token
reduction; > 1: fixed costs such as the optimizer step eat part of it). Writes learner_cost.json and
learner_cost.png to --out.
"""
import argparse
import dataclasses
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VARIANTS = {"grpo": dict(name="grpo"), "bppo_full": dict(name="bppo", prefix="full"),
            "bppo_prefix": dict(name="bppo", prefix="ratio", prefix_ratio=0.5)}


def rollout(args, hf):
    """Rendered prompts -> groups of max(G) completions (vLLM, one call), plus the tokenizer's pad id."""
    from transformers import AutoTokenizer

    from megatron_bppo.algorithms import AdaptiveScheduler
    from megatron_bppo.collect import collect_groups
    from megatron_bppo.config import RolloutConfig, load_config
    from megatron_bppo.data.prompts import open_dataset, render_prompts
    from megatron_bppo.rewards import get_reward
    from megatron_bppo.rollout import VLLMEngine

    cfg = load_config(None, [f"data.train={args.data}", "data.instruction=direct",
                             f"rollout.max_model_len={args.max_len}",
                             f"sampling.max_tokens={args.max_tokens}", f"sampling.temperature={args.temperature}",
                             f"sampling.seed={args.seed}", f"model.path={hf}"])
    tok = AutoTokenizer.from_pretrained(hf)
    prompts = render_prompts(cfg, tok, open_dataset(args.data, split="train", seed=args.seed, size=args.prompts))
    engine = VLLMEngine(hf, RolloutConfig(max_model_len=args.max_len, max_num_seqs=64,
                                          kv_cache_memory_bytes=args.kv_mb << 20, seed=args.seed))
    gmax = max(args.group_sizes)
    start = time.perf_counter()
    result = collect_groups(engine, AdaptiveScheduler.fixed(gmax), prompts, cfg.sampling, get_reward(args.reward), {},
                            seed=args.seed)
    seconds = time.perf_counter() - start
    engine.close()
    del engine
    gc.collect()
    return result.groups, seconds, tok.pad_token_id if tok.pad_token_id is not None else 0


def first_g(groups, g):
    return [dataclasses.replace(x, completions=x.completions[:g], rewards=x.rewards[:g], correct=x.correct[:g])
            for x in groups]


def padded_tokens(lengths, budget):
    from megatron_bppo.learner import pack_by_length

    return sum(len(grp) * lengths[grp[0]] for grp in pack_by_length(list(range(len(lengths))), lengths, budget))


def timed_update(model, hf_config, batch, algo, args, pad):
    """Fresh learner (untimed), then old log-probs + one train_step (timed), as trainer.rl_step runs them."""
    import torch

    from megatron_bppo.batch import attach_logprobs, policy_loss_fn
    from megatron_bppo.config import LearnerConfig, OptimConfig, ParallelConfig
    from megatron_bppo.learner import build_learner

    _, _, learner, _ = build_learner(
        model, ParallelConfig(), OptimConfig(lr=args.lr),
        LearnerConfig(micro_batch_tokens=args.micro_batch_tokens, max_seq_len=args.max_len), pad_id=pad,
        temperature=args.temperature, seed=args.seed, hf_config=hf_config)   # as the trainer: sampling temperature
    gc.collect()
    t0 = time.perf_counter()
    mismatch = attach_logprobs(batch, learner)         # overwrites the previous run's old log-probs of this batch
    t1 = time.perf_counter()
    metrics = learner.train_step(batch.sequences, batch.fields, policy_loss_fn(algo, batch))
    t2 = time.perf_counter()
    assert metrics["update_ok"] == 1.0 and torch.isfinite(torch.tensor(metrics["loss"])), metrics
    del learner
    gc.collect()
    return {"logprob_s": t1 - t0, "update_s": t2 - t1, "total_s": t2 - t0,
            "micro_batches": metrics["micro_batches"], "grad_norm": metrics["grad_norm"], "mismatch": mismatch}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--group-sizes", default="8,16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--data", default="arithmetic:l0_l5_mix")
    ap.add_argument("--reward", default="gsm8k", help="registered name or package.module:function")
    ap.add_argument("--prefix-min-tokens", type=int, default=1,
                    help="BPPO prefix floor: 1 = the pure ratio cut (the CPU demo uses 16, the default config 32)")
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--kv-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/learner_cost")
    args = ap.parse_args()
    args.group_sizes = sorted(int(g) for g in args.group_sizes.split(","))

    import torch

    from megatron_bppo.batch import build_update_batch, prefix_rule
    from megatron_bppo.config import AlgorithmConfig, ModelConfig, ParallelConfig
    from megatron_bppo.model.bridge import open_model
    from megatron_bppo.model.smollm2 import model_dir_or_default

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = model_dir_or_default(args.model)
    model = ModelConfig(path=args.model)
    os.environ.setdefault("MASTER_PORT", "29581")
    _, bridge = open_model(model, ParallelConfig(), seed=args.seed)   # process groups first: the engine joins them
    groups, rollout_s, pad = rollout(args, args.model)
    threads = torch.get_num_threads()
    print(f"[learner_cost] rollout: {len(groups)} prompts x {max(args.group_sizes)} completions in {rollout_s:.1f}s; "
          f"torch threads {threads}; load {os.getloadavg()[0]:.2f}", flush=True)

    cases = {}
    for g in args.group_sizes:
        sub = first_g(groups, g)
        for name, kw in VARIANTS.items():
            algo = AlgorithmConfig(**kw, group_size=g, prefix_min_tokens=args.prefix_min_tokens)
            batch = build_update_batch(sub, algo, prefix_rule(algo), step=1)
            lengths = [len(s) for s in batch.sequences]
            cases[(g, name)] = dict(
                G=g, variant=name, algo=algo, batch=batch, runs=[], sequences=len(batch.sequences),
                tokens=sum(lengths), response_tokens=batch.tokens,
                padded_tokens=padded_tokens(lengths, args.micro_batch_tokens),
                mixed_groups=batch.counts["mixed_groups"],
                accuracy=sum(c for x in sub for c in x.correct) / max(sum(len(x.correct) for x in sub), 1),
                mean_response_len=sum(len(c.token_ids) for x in sub for c in x.completions) / (len(sub) * g))
    for r in range(args.repeats):
        for key, case in cases.items():
            if not case["sequences"]:
                continue
            run = timed_update(model, bridge.hf_config, case["batch"], case["algo"], args, pad)
            run["load1"] = os.getloadavg()[0]
            case["runs"].append(run)
            print(f"[learner_cost] repeat {r + 1}/{args.repeats} G={key[0]} {key[1]:12s} {run['total_s']:7.2f}s "
                  f"(logprob {run['logprob_s']:.2f} + update {run['update_s']:.2f}), load {run['load1']:.2f}",
                  flush=True)

    rows = []
    for (g, name), case in cases.items():
        best = min(case["runs"], key=lambda x: x["total_s"]) if case["runs"] else None
        base = cases[(g, "grpo")]
        base_t = min(x["total_s"] for x in base["runs"])
        row = {k: v for k, v in case.items() if k not in ("algo", "batch")}
        row.update(best=best, time_s=best["total_s"] if best else None)
        if best:
            row.update(time_ratio=best["total_s"] / base_t, token_ratio=case["tokens"] / base["tokens"],
                       padded_ratio=case["padded_tokens"] / base["padded_tokens"])
            row.update(speedup=1 / row["time_ratio"], efficiency=row["time_ratio"] / row["token_ratio"])
        rows.append(row)

    print(f"\n{os.path.basename(args.model.rstrip('/'))} fp32, {args.prompts} prompts, T={args.temperature}, "
          f"max_tokens={args.max_tokens}, "
          f"min of {args.repeats} (interleaved), torch threads {threads}")
    print(f"{'G':>3} {'variant':12} {'seqs':>5} {'tokens':>7} {'padded':>7} {'time s':>7} {'logp s':>7} {'upd s':>7} "
          f"{'t/GRPO':>7} {'tok/GRPO':>8} {'speedup':>7} {'t/tok ratio':>11}")
    for row in rows:
        b = row["best"]
        if not b:
            print(f"{row['G']:>3} {row['variant']:12} {0:>5}  (no mixed group: nothing to train)")
            continue
        print(f"{row['G']:>3} {row['variant']:12} {row['sequences']:>5} {row['tokens']:>7} {row['padded_tokens']:>7} "
              f"{b['total_s']:7.2f} {b['logprob_s']:7.2f} {b['update_s']:7.2f} {row['time_ratio']:7.3f} "
              f"{row['token_ratio']:8.3f} {row['speedup']:7.2f} {row['efficiency']:11.2f}")
    os.makedirs(args.out, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    meta.update(rollout_s=rollout_s, torch_threads=threads, torch=torch.__version__, cpu_count=os.cpu_count())
    with open(os.path.join(args.out, "learner_cost.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    plot(rows, os.path.join(args.out, "learner_cost.png"), os.path.basename(args.model.rstrip("/")))
    print(f"[learner_cost] wrote {args.out}/learner_cost.json, learner_cost.png")


def plot(rows, path, model):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["best"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    x = range(len(rows))
    ax.bar([i - width / 2 for i in x], [r["time_ratio"] for r in rows], width, label="learner time / GRPO")
    ax.bar([i + width / 2 for i in x], [r["token_ratio"] for r in rows], width, label="learner tokens / GRPO")
    ax.set_xticks(list(x), [f"G={r['G']}\n{r['variant']}" for r in rows], fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("ratio vs GRPO (same rollout batch)")
    ax.set_title(f"Learner phase (old log-probs + train step), {model}, CPU", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
