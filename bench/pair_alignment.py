"""Pair alignment: how well each BPPO update variant points where GRPO's update points, on identical rollouts.

    python bench/pair_alignment.py [--prompts 16] [--group-size 8] [--subsets 4] [--seed 0]
                                   [--out runs/bench/pair_alignment]

Protocol (stated before any result). Rollout once (untimed, learner_cost.rollout): SmolLM2-135M-Instruct in the
in-process vLLM engine samples G completions at T=0.7 for --prompts generated arithmetic prompts
(arithmetic:l0_l5_mix, the CPU demo's task, rendered as the trainer renders them), scored by the gsm8k reward.
The prompts are split into --subsets equal subsets. For each subset and each variant the update batch is built
with the trainer's own functions (batch.build_update_batch -> attach_logprobs -> policy_loss_fn, token-mean) and
its gradient over the WHOLE model is taken through the Megatron learner (Learner.local_gradients; on-policy, so
the PPO ratio is 1 and nothing is clipped). Nothing is applied: every gradient is at the same weights.
    reference  GRPO: selector all, prefix full
    variants   selection x pair weighting x prefix:
               selection  binary (BPPO: shortest correct + shortest incorrect), random_pair (control 1: one
                          random correct + one random incorrect), random_two (control 2: two random completions
                          of a mixed group, any class)
               weighting  none (paper-literal), class_total, contrast (docs/algorithm.md section 3)
               prefix     full, ratio 0.5 (floor 16 tokens, as the CPU demo)
Reported per variant: cosine with GRPO's gradient on the whole prompt set (subset gradients summed with their
loss denominators, so it is the gradient of one batch of all prompts) and per subset (mean, min..max: the spread
over prompt subsets), and the norm ratio |g_variant| / |g_GRPO| on the whole set under each loss normaliser
(`trained`: the variant's own trained tokens; `rollout`: GRPO's denominator, every response token of the groups).
The normaliser only rescales a batch's gradient, so it changes norms, never cosines. A subset whose variant
gradient is exactly zero (contrast on two completions of one class) has no cosine and is left out of that
variant's subset statistics (`subsets` counts the ones used). Writes pair_alignment.json after every variant;
rerunning the same command skips the variants already there (the rollout is deterministic per seed).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SELECTIONS = ("binary", "random_pair", "random_two")
WEIGHTINGS = ("none", "class_total", "contrast")
RUN_KEYS = ("model", "prompts", "group_size", "subsets", "max_tokens", "max_len", "temperature", "data", "reward",
            "seed")
PREFIXES = {"full": dict(prefix="full"), "ratio0.5": dict(prefix="ratio", prefix_ratio=0.5, prefix_min_tokens=16)}


def register_random_two():
    """Control 2 as a selector: two uniformly random valid completions of each mixed group (seeded)."""
    import torch

    from megatron_bppo.algorithms import SELECTORS, SelectionResult, register_selector

    if "random_two" in SELECTORS:
        return

    @register_selector("random_two")
    def random_two(correct, lengths, advantages, valid=None, seed: int = 0):
        valid = torch.ones_like(correct, dtype=torch.bool) if valid is None else valid.bool()
        correct = correct.bool() & valid
        n, k = valid.sum(1), correct.sum(1)
        mixed = (k > 0) & (k < n)
        draw = torch.rand(correct.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
        rank = torch.where(valid, draw, torch.full_like(draw, 2.0)).argsort(dim=1).argsort(dim=1)
        mask = (rank < 2) & valid & mixed[:, None]
        return SelectionResult(mask, {"selected": int(mask.sum())})


def flat_gradient(learner, batch, algo):
    import torch

    from megatron_bppo.batch import attach_logprobs, policy_loss_fn

    attach_logprobs(batch, learner)
    grads = learner.local_gradients(batch.sequences, batch.fields, policy_loss_fn(algo, batch), lambda name: True)
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def combine(grads: list, weights: list, ref: list, ref_weights: list) -> tuple:
    """|sum_s w_s g_s|^2 and <sum_s w_s g_s, sum_t v_t r_t> from pairwise dot products (nothing summed in memory)."""
    sq = sum(w * x * float(a @ b) for a, w in zip(grads, weights) for b, x in zip(grads, weights))
    dot = sum(w * x * float(a @ b) for a, w in zip(grads, weights) for b, x in zip(ref, ref_weights))
    return sq, dot


def table(runs: list) -> str:
    """A markdown table of one or several runs' rows (one column group per run, e.g. per seed)."""
    head = "| selection / weighting / prefix |" + "".join(
        " cos all | cos per subset: mean [min..max] | norm / GRPO: trained, rollout |" for _ in runs)
    lines = [head, "|---|" + "---|---|---|" * len(runs)]
    for i, r in enumerate(runs[0]):
        cells = [f" {r['variant']} |"]
        for rows in runs:
            x = rows[i]
            cells.append(f" {x['cos_all']:.3f} | {x['cos_subsets_mean']:.2f} [{x['cos_subsets_min']:.2f}.."
                         f"{x['cos_subsets_max']:.2f}] | {x['norm_ratio_trained']:.2f}, "
                         f"{x['norm_ratio_rollout']:.2f} |")
        lines.append("|" + "".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the table of finished runs (e.g. bench/results/pair_alignment_seed*.json) and exit")
    ap.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--subsets", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--data", default="arithmetic:l0_l5_mix")
    ap.add_argument("--reward", default="gsm8k")
    ap.add_argument("--kv-mb", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/pair_alignment")
    args = ap.parse_args()
    if args.report:
        runs = []
        for path in args.report:
            with open(path) as f:
                runs.append(json.load(f)["rows"])
        print(table(runs))
        return
    args.group_sizes = [args.group_size]

    import torch

    from learner_cost import rollout
    from megatron_bppo.batch import build_update_batch, loss_normalizer, prefix_rule
    from megatron_bppo.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_bppo.learner import build_learner
    from megatron_bppo.model.smollm2 import model_dir_or_default
    from megatron_bppo.seeds import rollout_step_seed

    register_random_two()
    started = time.perf_counter()
    args.model = model_dir_or_default(args.model)
    os.environ.setdefault("MASTER_PORT", "29583")
    _, _, learner, _ = build_learner(
        ModelConfig(path=args.model), ParallelConfig(), OptimConfig(lr=1e-6, use_distributed_optimizer=False),
        LearnerConfig(micro_batch_tokens=2048, max_seq_len=args.max_len), temperature=args.temperature,
        seed=args.seed)                              # process groups first: the engine joins them
    groups, rollout_s, _ = rollout(args, args.model)
    correct = [sum(g.correct) for g in groups]
    print(f"[pair_alignment] {len(groups)} prompts x G={args.group_size} in {rollout_s:.0f}s; correct per group "
          f"{correct}; mixed {sum(0 < c < args.group_size for c in correct)}", flush=True)

    size = len(groups) // args.subsets
    subsets = [groups[i * size:(i + 1) * size] for i in range(args.subsets)]
    variants = {"grpo": AlgorithmConfig(name="grpo", group_size=args.group_size)}
    for sel in SELECTIONS:
        for weighting in WEIGHTINGS:
            for pname, pkw in PREFIXES.items():
                variants[f"{sel}/{weighting}/{pname}"] = AlgorithmConfig(
                    name="bppo", selector=sel, pair_weighting=weighting, group_size=args.group_size, **pkw)

    def gradients(algo, name):
        """Per subset: (flat gradient, trained denominator, rollout denominator), or None for an empty batch."""
        out = []
        for si, sub in enumerate(subsets):
            batch = build_update_batch(sub, algo, prefix_rule(algo), step=1, step_seed=rollout_step_seed(args.seed, si))
            out.append(None if batch.empty else (flat_gradient(learner, batch, algo),
                                                 loss_normalizer(batch, "token-mean"),
                                                 loss_normalizer(batch, "token-mean", "rollout")))
        print(f"[pair_alignment] {name}: {time.perf_counter() - started:.0f}s", flush=True)
        return out

    # Variant-major, so that only GRPO's and one variant's subset gradients are held (each one model's size).
    ref = gradients(variants.pop("grpo"), "grpo")
    ref_g, ref_d = [r[0] for r in ref], [r[1] for r in ref]
    ref_sq, _ = combine(ref_g, ref_d, ref_g, ref_d)
    ref_norm = ref_sq ** 0.5 / sum(ref_d)                  # the gradient of one batch of all prompts, normalised
    path = os.path.join(args.out, "pair_alignment.json")
    meta = {k: v for k, v in vars(args).items()}
    meta.update(rollout_s=rollout_s, correct_per_group=correct, torch=torch.__version__)
    done = {}
    if os.path.isfile(path):                   # resume: the rollout is deterministic for the same arguments
        previous = json.load(open(path))
        if {k: previous["meta"].get(k) for k in RUN_KEYS} == {k: meta[k] for k in RUN_KEYS}:
            done = {r["variant"]: r for r in previous["rows"]}
    rows = []
    for name, algo in variants.items():
        if name in done:
            rows.append(done[name])
            continue
        # a subset whose variant gradient is zero (e.g. contrast on two completions of one class) has no cosine
        parts = [(p, r) for p, r in zip(gradients(algo, name), ref) if p is not None]
        subs = [float(p[0] @ r[0]) / float(p[0].norm() * r[0].norm()) for p, r in parts if float(p[0].norm()) > 0]
        sq, dot = combine([p[0] for p, _ in parts], [p[1] for p, _ in parts], ref_g, ref_d)
        trained, rollout_tokens = sum(p[1] for p, _ in parts), sum(r[2] for r in ref)   # GRPO's: every group
        nan = float("nan")
        rows.append({"variant": name, "cos_all": dot / (sq ** 0.5 * ref_sq ** 0.5) if sq > 0 else nan,
                     "cos_subsets_mean": sum(subs) / len(subs) if subs else nan,
                     "cos_subsets_min": min(subs, default=nan), "cos_subsets_max": max(subs, default=nan),
                     "subsets": len(subs),
                     "norm_ratio_trained": sq ** 0.5 / trained / ref_norm if trained else nan,
                     "norm_ratio_rollout": sq ** 0.5 / rollout_tokens / ref_norm})
        del parts
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:             # after every variant: a crash or a kill loses at most one
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\n{os.path.basename(args.model.rstrip('/'))}, {len(groups)} prompts x G={args.group_size}, "
          f"{args.subsets} subsets, seed {args.seed}: cosine with GRPO's whole-model gradient (token-mean)")
    print(table([rows]))
    meta.update(wall_s=time.perf_counter() - started)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"[pair_alignment] wrote {args.out}/pair_alignment.json in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
