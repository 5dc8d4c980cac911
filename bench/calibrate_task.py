"""Calibrate a generated arithmetic task on the real model before training on it: is it in the useful range?

    nice -n 10 python bench/calibrate_task.py --preset NAME[,NAME...] [--heldout 256] [--train-prompts 64]
        [--group-size 8] [--max-tokens 256] [--instruction cot] [--data-seed 0]
        [--config examples/configs/smollm2_bppo_cpu.yaml] [--model ''] [--out bench/results] [key=value ...]

Protocol (printed before anything runs). For each preset, in one process (world size 1, one vLLM engine; under
`torchrun --nproc-per-node 2` one engine replica per rank, as in training):
  prompts     the trainer's own path: the CPU config (--config) + data.train=arithmetic:<preset>,
              data.instruction, data.seed, data.eval_size=--heldout, sampling.max_tokens=--max-tokens and the
              extra key=value overrides -> data/prompts.py prompts_from_config -> (train prompts, held-out prompts)
              (the held-out set is the preset's test split seeded with data.seed + 1, exactly what a run evaluates)
  identity    distinct held-out problems by canonical identity (meta["canonical"], the preset's rule) and the
              number of held-out identities that also occur among the train prompts (must be 0)
  greedy      every held-out prompt once at temperature 0 (the evaluation's greedy settings), scored by the
              config's reward (megatron_bppo.rewards via evaluation._score, i.e. collect.score_once):
              pass@1 with a 95 % Wilson interval; mean / median response length; truncation rate (share of
              completions that stopped at max_tokens, finish_reason "length")
  groups      the first --train-prompts train prompts in the trainer's order (PromptSampler, seed data.seed) x
              --group-size samples at the config's sampling temperature and seed: share of mixed groups (some
              correct, some wrong), all-correct, all-wrong; sampled accuracy; sampled length and truncation
  timing      seconds and generated tokens of each phase (one engine on this machine; a budget input)
Writes <out>/calibration_<preset>.json (settings, the numbers above, per-level breakdown, a few examples).

    python bench/calibrate_task.py --final-eval OUT.json --model <hf dir> --preset NAME --heldout 256
        --samples K --sampling-seed S [task overrides]
is the held-out evaluation of a trained model (bench/head_to_head.py runs it after every job): the same prompts
and greedy pass@1 as above, kept per problem (a 0/1 string in held-out order), plus mean@K sampled at the
config's temperature with the trainer's evaluation seed (seeds.eval_seed(S)), per problem (correct counts).
What the "useful range" is (issue 16): greedy held-out pass@1 about 0.15-0.5, mean response length >= 60
tokens, >= 256 distinct held-out problems, none in training, and enough mixed groups to train on.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One OpenMP thread, as every training rank runs: with two, oneDNN's GEMMs spin in OpenMP barriers whenever the
# machine is shared and generation slows down many times over. Set it in the environment to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="arithmetic preset(s), comma-separated")
    p.add_argument("--heldout", type=int, default=256, help="held-out prompts (data.eval_size)")
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--instruction", default="cot")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--config", default="examples/configs/smollm2_bppo_cpu.yaml")
    p.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--final-eval", metavar="OUT_JSON", default="",
                   help="evaluate --model on the held-out set only (greedy per problem + mean@--samples)")
    p.add_argument("--samples", type=int, default=4, help="--final-eval: k of mean@k")
    p.add_argument("--sampling-seed", type=int, default=0, help="--final-eval: the run's sampling seed")
    p.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = p.parse_args(argv)
    args.presets = args.preset.split(",")
    return args


def task_config(args, preset: str, model: str):
    from megatron_bppo.config import load_config

    return load_config(os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config, [
        f"model.path={model}", f"data.train=arithmetic:{preset}", f"data.instruction={args.instruction}",
        f"data.seed={args.data_seed}", f"data.eval_size={args.heldout}", f"sampling.max_tokens={args.max_tokens}",
        *args.overrides])


def identity(rendered) -> str:
    meta = rendered.example.meta
    return meta.get("canonical", meta.get("expression", rendered.example.prompt))


def held_out_checks(train, held_out) -> dict:
    ids = [identity(r) for r in held_out]
    train_ids = {identity(r) for r in train}
    return {"heldout_prompts": len(held_out), "heldout_distinct": len(set(ids)),
            "heldout_in_train": len(set(ids) & train_ids), "train_prompts": len(train),
            "train_distinct": len(train_ids)}


def generate_scored(engine, prompts, n, sampling, reward_fn, reward_kwargs):
    """engine.generate + the evaluation's scoring (evaluation.score_completions) -> flat (correct, lengths, finish
    reasons, texts) and seconds."""
    from megatron_bppo.evaluation import score_completions

    started = time.perf_counter()
    completions = engine.generate([list(r.token_ids) for r in prompts], n, sampling)
    seconds = time.perf_counter() - started
    flat = [r for per_prompt in score_completions(completions, prompts, reward_fn, reward_kwargs) for r in per_prompt]
    return ([r["correct"] for r in flat], [r["length"] for r in flat], [r["finish"] for r in flat],
            [r["response"] for r in flat], seconds)


def length_stats(lengths, finish, max_tokens) -> dict:
    return {"mean": statistics.fmean(lengths), "median": statistics.median(lengths),
            "p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))],
            "truncated": sum(f == "length" for f in finish) / len(finish), "max_tokens": max_tokens}


def calibrate(args, preset, engine, tokenizer, model) -> dict:
    from megatron_bppo.data import PromptSampler, prompts_from_config
    from megatron_bppo.rewards import get_reward

    cfg = task_config(args, preset, model)
    train, held_out = prompts_from_config(cfg, tokenizer)
    out = {"preset": preset, "settings": {
        "config": args.config, "instruction": cfg.data.instruction, "data_seed": cfg.data.seed,
        "heldout_seed": None, "max_tokens": cfg.sampling.max_tokens, "temperature": cfg.sampling.temperature,
        "sampling_seed": cfg.sampling.seed, "group_size": args.group_size, "reward": cfg.reward.name,
        "train_size": len(train), "overrides": args.overrides}}
    from megatron_bppo.seeds import HELD_OUT_SEED_OFFSET

    out["settings"]["heldout_seed"] = cfg.data.seed + HELD_OUT_SEED_OFFSET
    out["identity"] = held_out_checks(train, held_out)
    out["prompt_tokens_mean"] = statistics.fmean(len(r.token_ids) for r in held_out)
    reward_fn, kwargs = get_reward(cfg.reward.name), cfg.reward.kwargs

    greedy = dataclasses.replace(cfg.sampling, temperature=0.0, top_p=1.0, seed=None)   # as evaluation's
    correct, lengths, finish, texts, seconds = generate_scored(engine, held_out, 1, greedy, reward_fn, kwargs)
    print(f"[calibrate] {preset}: greedy on {len(held_out)} held-out prompts in {seconds:.0f}s "
          f"({sum(lengths)} tokens)", flush=True)
    k = sum(correct)
    lo, hi = wilson(k, len(correct))
    levels = {}
    for r, ok, n in zip(held_out, correct, lengths):
        meta = r.example.meta
        ops = "".join(sorted({t for t in str(meta.get("expression", "")).split() if t in "+-*/"}))
        lv = levels.setdefault(f"{meta.get('level', '?')} {ops} {meta.get('num_ops', '')}ops",
                               {"n": 0, "correct": 0, "length": 0.0})
        lv["n"] += 1
        lv["correct"] += ok
        lv["length"] += n
    for lv in levels.values():
        lv["accuracy"], lv["length"] = lv["correct"] / lv["n"], lv["length"] / lv["n"]
    out["greedy"] = {"pass@1": k / len(correct), "correct": k, "n": len(correct), "ci95": [lo, hi],
                     "length": length_stats(lengths, finish, cfg.sampling.max_tokens), "seconds": seconds,
                     "tokens": sum(lengths), "by_kind": levels}
    out["examples"] = [{"prompt": r.example.prompt, "reference": r.example.reference, "correct": ok,
                        "response": t[:600]} for r, ok, t in list(zip(held_out, correct, texts))[:4]]

    order = PromptSampler(len(train), seed=cfg.data.seed).next_indices(min(args.train_prompts, len(train)))
    group_prompts = [train[i] for i in order]
    correct, lengths, finish, _, seconds = generate_scored(engine, group_prompts, args.group_size, cfg.sampling,
                                                          reward_fn, kwargs)
    print(f"[calibrate] {preset}: {len(group_prompts)} x {args.group_size} samples in {seconds:.0f}s "
          f"({sum(lengths)} tokens)", flush=True)
    g = args.group_size
    per_group = [sum(correct[i * g:(i + 1) * g]) for i in range(len(group_prompts))]
    n = len(per_group)
    out["groups"] = {"prompts": n, "group_size": g, "temperature": cfg.sampling.temperature,
                     "mixed": sum(0 < c < g for c in per_group) / n, "all_correct": per_group.count(g) / n,
                     "all_wrong": per_group.count(0) / n, "sampled_accuracy": sum(correct) / len(correct),
                     "correct_per_group": per_group,
                     "length": length_stats(lengths, finish, cfg.sampling.max_tokens), "seconds": seconds,
                     "tokens": sum(lengths)}
    return out


def final_eval(args, engine, tokenizer, model) -> dict:
    """Greedy pass@1 per held-out problem and mean@k (see the module docstring): evaluation.evaluate_problems, the
    implementation `megatron-bppo eval` and the trainer's checks use, in this file's committed format."""
    from megatron_bppo.data import prompts_from_config
    from megatron_bppo.evaluation import evaluate_problems
    from megatron_bppo.rewards import get_reward
    from megatron_bppo.seeds import eval_seed

    cfg = task_config(args, args.presets[0], model)
    _, held_out = prompts_from_config(cfg, tokenizer)
    seconds = {}

    def progress(phase, tokens, took):      # each phase's seconds: generation and scoring
        seconds[phase] = took

    problems = evaluate_problems(engine, held_out, cfg.sampling, get_reward(cfg.reward.name), cfg.reward.kwargs,
                                 args.samples, eval_seed(args.sampling_seed), progress)    # as the trainer's checks
    greedy = [p["greedy"] for p in problems]
    correct, lengths = [r["correct"] for r in greedy], [r["length"] for r in greedy]
    out = {"model": model, "preset": args.presets[0], "heldout": len(held_out),
           "heldout_identities": held_out_checks([], held_out)["heldout_distinct"],
           "greedy": {"pass@1": sum(correct) / len(correct), "n": len(correct),
                      "ci95": list(wilson(sum(correct), len(correct))),
                      "bits": "".join("1" if c else "0" for c in correct), "lengths": lengths,
                      "length": length_stats(lengths, [r["finish"] for r in greedy], cfg.sampling.max_tokens),
                      "seconds": seconds["greedy"]}}
    if args.samples > 0:
        k = args.samples
        flat = [r for p in problems for r in p["samples"]]
        out["mean_at_k"] = {"k": k, "accuracy": sum(r["correct"] for r in flat) / len(flat),
                            "temperature": cfg.sampling.temperature, "seed": eval_seed(args.sampling_seed),
                            "per_problem": [sum(r["correct"] for r in p["samples"]) for p in problems],
                            "length": length_stats([r["length"] for r in flat], [r["finish"] for r in flat],
                                                   cfg.sampling.max_tokens),
                            "seconds": seconds[f"{k} samples"]}
    return out


def report_line(r) -> str:
    gr, gp, idn = r["greedy"], r["groups"], r["identity"]
    return (f"| {r['preset']} | {idn['heldout_distinct']} of {idn['heldout_prompts']} ({idn['heldout_in_train']} in "
            f"train) | {gr['pass@1']:.3f} [{gr['ci95'][0]:.3f}, {gr['ci95'][1]:.3f}] | {gr['length']['mean']:.0f} / "
            f"{gr['length']['median']:.0f} | {gr['length']['truncated']:.1%} | {gp['mixed']:.2f} / "
            f"{gp['all_correct']:.2f} / {gp['all_wrong']:.2f} | {gp['sampled_accuracy']:.3f} | "
            f"{gp['length']['mean']:.0f} | {gr['seconds']:.0f} + {gp['seconds']:.0f} |")


HEADER = ("| preset | distinct held-out | greedy pass@1 [95 % CI] | length mean / median | truncated | groups mixed / "
          "all-correct / all-wrong | sampled acc | sampled length | seconds (greedy + groups) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    args = parse_args(argv)
    if not args.final_eval:
        print(__doc__.split("\n\n", 2)[2].split("Writes")[0].rstrip(), flush=True)
    print(f"\n[calibrate] presets {args.presets}; {args.heldout} held-out, {args.train_prompts} train prompts x "
          f"G={args.group_size}, max_tokens {args.max_tokens}, instruction {args.instruction}, data seed "
          f"{args.data_seed}, overrides {args.overrides}", flush=True)
    from transformers import AutoTokenizer

    from megatron_bppo.model.smollm2 import model_dir_or_default
    from megatron_bppo.rollout import VLLMEngine

    model = model_dir_or_default(args.model)
    cfg = task_config(args, args.presets[0], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rank0 = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun: one engine replica per rank, as in training (generate() splits the prompts over the
        # replicas and gathers the completions on every rank; scoring is split too: collect.score_once)
        from megatron_bppo.distributed import init_distributed, is_rank0

        init_distributed(cfg.parallel)
        rank0 = is_rank0()
    started = time.perf_counter()
    engine = VLLMEngine(model, cfg.rollout, dtype=cfg.model.dtype)
    print(f"[calibrate] engine up in {time.perf_counter() - started:.0f}s", flush=True)
    if args.final_eval:
        try:
            out = final_eval(args, engine, tokenizer, model)
        finally:
            engine.close()
        if not rank0:
            return 0
        tmp = args.final_eval + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.final_eval)
        print(f"[final-eval] pass@1 {out['greedy']['pass@1']:.3f} on {out['heldout']}; "
              + (f"mean@{args.samples} {out['mean_at_k']['accuracy']:.3f}; " if args.samples else "")
              + f"wrote {args.final_eval}", flush=True)
        return 0
    results = []
    try:
        for preset in args.presets:
            r = calibrate(args, preset, engine, tokenizer, model)
            if not rank0:
                continue
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"calibration_{preset}.json")
            with open(path, "w") as f:
                json.dump(r, f, indent=2)
            results.append(r)
            print(f"[calibrate] {preset}: wrote {path}\n{HEADER}\n{report_line(r)}", flush=True)
    finally:
        engine.close()
    if rank0:
        print("\n" + HEADER + "\n" + "\n".join(report_line(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
