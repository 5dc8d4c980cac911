"""Gradient-similarity analysis (BPPO paper): do same-class completions of a group push the policy the same way?

    prompts (megatron_bppo.data.prompts) --(vLLM rollout engine on every rank, G completions each)--> completions
      --(reward: megatron_bppo.rewards, or a coin flip for the control)--> classes (correct / wrong)
    each completion --(Megatron learner: grad of its mean response log-prob, selected params, any TP/PP)--> g_i
    {g_i} --(Gram matrix summed over TP shards and PP stages)--> cosine matrix per group
      --> mean same-class (correct/correct, wrong/wrong) vs cross-class cosine, PNG heatmaps, summary table

g_i is the score-function gradient of completion i, d/dθ (1/|y_i|) Σ_t log π(y_i,t | x, y_i,<t). Its
contribution to a GRPO/BPPO update is A_i·g_i, so the cosine of two update directions is sign(A_i A_j) times
the cosine reported here (same class: same sign; cross class: flipped).

Prompts, sampling and scoring are the trainer's: `--data` through open_dataset / render_prompts (instruction
"direct" after the question), the in-process VLLMEngine through collect.collect_groups (seeded per prompt, so
every layout samples the same completions), and a registered reward (`--reward`, default gsm8k).

    python bench/grad_similarity.py --out runs/gradsim                      # SmolLM2-135M-Instruct, 1 process
    torchrun --nproc-per-node 2 bench/grad_similarity.py --model H --tp 2 --out D
`--reward random:SEED` labels completions by a coin flip: a control in which classes carry no signal, so
same- and cross-class similarities should agree.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def coin_flip_reward(seed: int):
    """The control's reward: each completion is 'correct' with probability 1/2, whatever it says. Every rank
    scores the same completions in the same order (collect_groups), so every rank draws the same labels."""
    from megatron_bppo.rewards import RewardResult

    rng = random.Random(seed)

    def reward(text: str, reference: str) -> RewardResult:
        correct = rng.random() < 0.5
        return RewardResult(float(correct), correct)

    return reward


def sample(args, prompts, cfg, reward_fn):
    """Every rank: the groups of G completions (collect.collect_groups), one generate call on the rollout engine."""
    from megatron_bppo.algorithms import AdaptiveScheduler
    from megatron_bppo.collect import collect_groups
    from megatron_bppo.config import RolloutConfig
    from megatron_bppo.rollout import VLLMEngine

    engine = VLLMEngine(args.model, RolloutConfig(max_model_len=args.max_len, max_num_seqs=64,
                                                  kv_cache_memory_bytes=args.kv_mb << 20, seed=args.seed))
    try:
        return collect_groups(engine, AdaptiveScheduler.fixed(args.group_size), prompts, cfg.sampling, reward_fn,
                              {}, seed=args.seed).groups
    finally:
        engine.close()


def gram_matrix(learner, sequences, prompt_lengths, select) -> torch.Tensor:
    """Gram matrix of per-completion score gradients, summed over TP shards and PP stages."""
    from megatron.core import parallel_state as ps

    flats = []
    for seq, prompt_len in zip(sequences, prompt_lengths):
        response = torch.zeros(len(seq) - 1)
        response[prompt_len - 1:] = 1.0 / (len(seq) - prompt_len)
        grads = learner.local_gradients([seq], [{"w": response}],
                                        lambda lp, mb: (-(lp * mb.fields["w"]).sum(), {}), select)
        params = dict(learner.unwrapped_models()[0].named_parameters())
        keep = [g.flatten() for name, g in sorted(grads.items())
                if getattr(params[name], "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0]
        flats.append(torch.cat(keep) if keep else torch.zeros(0, device=learner.device))
    stacked = torch.stack(flats).double()
    gram = stacked @ stacked.T
    if dist.is_initialized():
        dist.all_reduce(gram, group=ps.get_model_parallel_group())
    return gram.cpu()


def summarize(groups: list[dict]) -> dict:
    """Mean pairwise cosine by class relation. `score` = raw score gradients g_i; `update` = the directions a
    GRPO/BPPO step applies, A_i g_i, whose cosine flips sign across classes (A+ > 0 > A-)."""
    pairs = {"correct_correct": [], "wrong_wrong": [], "cross_class": []}
    for g in groups:
        cos, lab = g["cosine"], g["correct"]
        for i in range(len(lab)):
            for j in range(i + 1, len(lab)):
                key = "cross_class" if lab[i] != lab[j] else "correct_correct" if lab[i] else "wrong_wrong"
                pairs[key].append(cos[i][j])
    pairs["same_class"] = pairs["correct_correct"] + pairs["wrong_wrong"]

    def stats(xs, sign=1.0):
        t = torch.tensor(xs, dtype=torch.float64) * sign if xs else torch.tensor([float("nan")])
        return {"mean": t.mean().item(), "std": t.std().item() if len(xs) > 1 else 0.0, "pairs": len(xs)}

    out = {key: stats(xs) for key, xs in pairs.items()}
    out["update_direction"] = {"same_class": stats(pairs["same_class"]),
                               "cross_class": stats(pairs["cross_class"], -1.0)}
    out["mixed_groups"] = sum(1 for g in groups if 0 < sum(g["correct"]) < len(g["correct"]))
    out["groups"] = len(groups)
    return out


def draw(groups, summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        order = sorted(range(len(g["correct"])), key=lambda i: (not g["correct"][i], i))
        cos = torch.tensor(g["cosine"])[order][:, order]
        im = ax.imshow(cos.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ticks = ["C" if g["correct"][i] else "W" for i in order]
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(g["question"][:28], fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.04)
    fig.suptitle(f"cosine of per-completion gradients: same-class {summary['same_class']['mean']:.3f}, "
                 f"cross-class {summary['cross_class']['mean']:.3f}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary) -> str:
    lines = ["| pairs | count | score-gradient cosine (mean +- std) | update-direction cosine A_i g_i |",
             "|---|---|---|---|"]
    for key in ("same_class", "correct_correct", "wrong_wrong", "cross_class"):
        s = summary[key]
        sign = -1 if key == "cross_class" else 1
        lines.append(f"| {key} | {s['pairs']} | {s['mean']:+.4f} +- {s['std']:.4f} | {sign * s['mean']:+.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF checkpoint dir (default: SmolLM2-135M-Instruct, prepared)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="arithmetic:l0",
                    help="prompt source as data.train takes it (arithmetic:<preset> or a jsonl / parquet file)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-len", type=int, default=512, help="longest prompt + completion (engine and learner)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--kv-mb", type=int, default=256, help="vLLM KV cache per rank, MiB")
    ap.add_argument("--params", default="last-layer",
                    help="regex over Megatron parameter names, or 'last-layer' (every weight of the last layer)")
    ap.add_argument("--reward", default="gsm8k",
                    help="registered reward name or package.module:function; random:SEED for the control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollouts", default="",
                    help="gradsim.json of an earlier run: reuse its completions instead of sampling (the same "
                         "prompt arguments), e.g. to compare learner layouts on identical inputs")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from megatron_bppo.config import LearnerConfig, OptimConfig, ParallelConfig, load_config
    from megatron_bppo.data.prompts import open_dataset, render_prompts
    from megatron_bppo.distributed import print_rank0
    from megatron_bppo.learner import build_learner
    from megatron_bppo.model.smollm2 import model_dir_or_default
    from megatron_bppo.rewards import get_reward

    args.model = model_dir_or_default(args.model)
    reward_fn = (coin_flip_reward(int(args.reward.partition(":")[2] or 0)) if args.reward.startswith("random:")
                 else get_reward(args.reward))
    cfg = load_config(None, [f"model.path={args.model}", f"data.train={args.data}", "data.instruction=direct",
                             "data.instruction_position=suffix", f"rollout.max_model_len={args.max_len}",
                             f"sampling.max_tokens={args.max_new_tokens}", f"sampling.temperature={args.temperature}",
                             f"sampling.seed={args.seed}"])
    prompts = render_prompts(cfg, AutoTokenizer.from_pretrained(args.model),
                             open_dataset(args.data, split="train", seed=args.seed, size=args.prompts))
    # the learner first: its process groups are the ones the engine joins
    launch, bridge, learner, _ = build_learner(
        cfg.model, ParallelConfig(tp=args.tp, pp=args.pp), OptimConfig(lr=1e-6, use_distributed_optimizer=False),
        LearnerConfig(micro_batch_tokens=max(4096, args.max_len), max_seq_len=args.max_len), seed=args.seed)
    start = time.time()
    if args.rollouts:                  # the completions of an earlier run: compare layouts on identical inputs
        with open(args.rollouts) as f:
            sampled = dict(zip((r.example.id for r in prompts), json.load(f)["groups"]))
        print_rank0(f"[gradsim] {len(sampled)} groups of completions from {args.rollouts}")
    else:
        sampled = {g.prompt_id: {"prompt_ids": g.prompt_ids, "answer": g.reference,
                                 "responses": [list(c.token_ids) for c in g.completions],
                                 "texts": [c.text for c in g.completions], "correct": list(g.correct),
                                 "rewards": list(g.rewards)} for g in sample(args, prompts, cfg, reward_fn)}
        print_rank0(f"[gradsim] sampled {len(sampled)}x{args.group_size} completions in {time.time() - start:.1f}s")

    layers = bridge.hf_config.num_hidden_layers
    pattern = re.compile(rf"decoder\.layers\.{layers - 1}\." if args.params == "last-layer" else args.params)
    from megatron.core import parallel_state as ps
    offset = ps.get_pipeline_model_parallel_rank() * (layers // args.pp)

    def select(name):      # Megatron names are stage-local: map the layer index back to the global one
        global_name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        return bool(pattern.search(global_name))

    groups = []
    for rendered in prompts:
        group = sampled[rendered.example.id]
        responses, prompt_ids = group["responses"], group["prompt_ids"]
        seqs = [torch.tensor(prompt_ids + r) for r in responses]
        gram = gram_matrix(learner, seqs, [len(prompt_ids)] * len(seqs), select)
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        cos = gram / norms[:, None] / norms[None, :]
        question = rendered.example.prompt or rendered.text
        groups.append({"question": question, "answer": group["answer"], "texts": group["texts"],
                       "prompt_ids": prompt_ids, "responses": responses, "correct": group["correct"],
                       "rewards": group["rewards"], "lengths": [len(r) for r in responses], "cosine": cos.tolist(),
                       "grad_norms": norms.tolist()})
        print_rank0(f"[gradsim] {question}: {sum(group['correct'])}/{len(responses)} correct "
                    f"({time.time() - start:.0f}s)")
    summary = summarize(groups)
    summary.update(model=args.model, data=args.data, params=args.params, reward=args.reward, tp=args.tp,
                   pp=args.pp, seconds=time.time() - start)
    if launch.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gradsim.json"), "w") as f:
            json.dump({"summary": summary, "groups": groups}, f, indent=1)
        draw(groups, summary, os.path.join(args.out, "gradsim.png"))
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table(summary) + "\n")
        print(table(summary))
        print(f"[gradsim] wrote {args.out}/gradsim.json, gradsim.png, summary.md")


if __name__ == "__main__":
    main()
