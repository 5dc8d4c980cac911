"""Rollout cost, GRPO vs BPPO: the rollout phase alone, on the same prompts and seeds, side by side in one process.

    python bench/rollout_cost.py [--config examples/configs/smollm2_bppo_cpu.yaml] [--steps 4]
                                 [--arms grpo,bppo_rounds,bppo,bppo_stop_incorrect,bppo_stop_exclude]
                                 [--out runs/bench/rollout_cost] [--report] [key=value ...]

Protocol. One in-process vLLM engine (world size 1) with the config's model (default: SmolLM2-135M-Instruct, the
CPU demo's config, its task and sampling), weights as loaded: no training, so every arm samples from the same
policy. Each bench step takes the next data.prompts_per_step training prompts (the same for every arm) and the
step's rollout seed (trainer: seeds.rollout_step_seed), and runs collect.collect_groups for every arm in turn,
the arm order rotated per step so drift hits each alike. Each arm keeps its own AdaptiveScheduler across steps,
as a training run does. Draw-more prompts (algorithm.target_pairs, off in the demo config) come from a pool
after the step prompts, the same for every arm. Arms (overrides on the config):
    grpo                 algorithm.name=grpo                           G completions each, one batch
    bppo_rounds          algorithm.name=bppo rollout.schedule=rounds   adaptive, a generate call per round
    bppo                 algorithm.name=bppo                           adaptive, streamed (the default)
    bppo_stop_incorrect  ... algorithm.early_stop=as_incorrect         + unselectable samples stopped, wrong
    bppo_stop_exclude    ... algorithm.early_stop=exclude              + unselectable samples stopped, left out
Measured per arm and step: rollout seconds (collect_groups wall time minus reward scoring), tokens generated,
tokens trained (build_update_batch with the arm's algorithm: kept prefix tokens of the selected samples),
tokens generated only for a reward, tokens stopped, samples, mixed groups; for the stop arms against `bppo` (same
per-sample seeds, so the same completions): how many stopped samples would have ended correct next to their
groups' accuracy, and the mean |change| of the trained pairs' advantages. Reported: per-arm means, and each
arm's ratio to GRPO paired by step (mean, min..max over steps). Accuracy is not measured here (no training):
docs/benchmarks.md says where the early-stop policies' effect on accuracy stands. Writes rollout_cost.json
after every step (rerunning continues) and --report prints the table from it; docs/benchmarks.md section 7 is
`--report --out bench/results/rollout_cost_smollm2.json`.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ARMS = {"grpo": ["algorithm.name=grpo"],
        "bppo_rounds": ["algorithm.name=bppo", "rollout.schedule=rounds"],
        "bppo": ["algorithm.name=bppo"],
        "bppo_stop_incorrect": ["algorithm.name=bppo", "algorithm.early_stop=as_incorrect"],
        "bppo_stop_exclude": ["algorithm.name=bppo", "algorithm.early_stop=exclude"]}
FIELDS = ("seconds", "generated", "trained", "reward_only", "stopped", "samples", "mixed")


def stop_effects(exact, cut) -> dict:
    """A stop arm against the `bppo` arm of the same step (same per-sample seeds, so the same completions): how
    many stopped samples would have ended correct, against their groups' accuracy, and how far the trained
    pair's advantages moved (docs/algorithm.md section 11)."""
    from megatron_bppo.batch import ADVANTAGE

    groups = {g.prompt_id: g for g in exact["groups"]}
    stopped = would_be_correct = 0
    group_rate = []
    for g in cut["groups"]:
        full = {c.sample_index: ok for c, ok in zip(groups[g.prompt_id].completions, groups[g.prompt_id].correct)}
        kept = {c.sample_index for c in g.completions if c.finish_reason != "abort"}
        gone = [i for i in full if i not in kept]
        stopped += len(gone)
        would_be_correct += sum(full[i] for i in gone)
        group_rate += [sum(full.values()) / len(full)] * len(gone)

    def advantages(arm):
        return {(arm["groups"][gi].prompt_id, arm["groups"][gi].completions[ci].sample_index): float(f[ADVANTAGE][0])
                for (gi, ci), f in zip(arm["batch"].origin, arm["batch"].fields)}
    a, b = advantages(exact), advantages(cut)
    shift = [abs(b[k] - a[k]) for k in a if k in b]
    return {"stopped_would_be_correct": would_be_correct, "stopped_matched": stopped,
            "stopped_groups_accuracy": statistics.mean(group_rate) if group_rate else None,
            "pair_adv_abs_shift": statistics.mean(shift) if shift else 0.0,
            "pairs_same": sorted(a) == sorted(b)}


def measure(args, overrides):
    from transformers import AutoTokenizer

    from megatron_bppo.batch import build_update_batch, prefix_rule
    from megatron_bppo.collect import collect_groups, sampling_schedule
    from megatron_bppo.config import load_config
    from megatron_bppo.data.prompts import open_dataset, render_prompts
    from megatron_bppo.model.smollm2 import model_dir_or_default
    from megatron_bppo.rewards import get_reward
    from megatron_bppo.rollout import VLLMEngine
    from megatron_bppo.seeds import rollout_step_seed

    model = model_dir_or_default(args.model)
    configs = {a: load_config(args.config, [f"model.path={model}", *overrides, *ARMS[a]]) for a in args.arms}
    base = configs[args.arms[0]]
    per_step = base.data.prompts_per_step
    pool = int(per_step * (base.algorithm.max_prompt_draw_factor - 1)) if base.algorithm.target_pairs else 0
    tok = AutoTokenizer.from_pretrained(model)
    rows = render_prompts(base, tok, open_dataset(base.data.train, split="train", seed=base.data.seed,
                                                  size=args.steps * (per_step + pool)))
    engine = VLLMEngine(model, base.rollout, dtype=base.model.dtype)
    schedules = {a: sampling_schedule(configs[a].algorithm, configs[a].sampling.seed) for a in args.arms}
    reward_fn = get_reward(base.reward.name)
    results = load(args.out)
    if results.get("protocol") not in (None, protocol(args, overrides)):
        raise SystemExit(f"{results_path(args.out)} was written with other settings: use another --out")
    results["protocol"], steps = protocol(args, overrides), results.setdefault("steps", [])
    for step in range(args.steps):
        first = step * (per_step + pool)
        prompts, extra = rows[first:first + per_step], list(rows[first + per_step:first + per_step + pool])
        order = args.arms[step % len(args.arms):] + args.arms[:step % len(args.arms)]
        record, kept = {}, {}
        for arm in order:
            cfg, stock = configs[arm], iter(extra)
            started = time.perf_counter()
            out = collect_groups(engine, schedules[arm], prompts, cfg.sampling, reward_fn, cfg.reward.kwargs,
                                 seed=rollout_step_seed(cfg.sampling.seed, step),
                                 draw_more=(lambda n, s=stock: [r for _, r in zip(range(n), s)])
                                 if cfg.algorithm.target_pairs else None,
                                 streaming=cfg.rollout.schedule == "stream", early_stop=cfg.algorithm.early_stop)
            seconds = time.perf_counter() - started - out.reward_seconds
            batch = build_update_batch(out.groups, cfg.algorithm, prefix_rule(cfg.algorithm), step,
                                       rollout_step_seed(cfg.sampling.seed, step))
            record[arm] = dict(seconds=seconds, **out.token_accounting(batch.tokens),
                               samples=sum(len(g.completions) for g in out.groups), mixed=batch.counts["mixed_groups"])
            kept[arm] = {"groups": out.groups, "batch": batch}
            print(f"step {step} {arm:20s} " + " ".join(f"{k} {v:.1f}" if k == "seconds" else f"{k} {v}"
                                                      for k, v in record[arm].items()), flush=True)
        for arm in order:
            if ARMS[arm][-1].startswith("algorithm.early_stop") and "bppo" in kept:
                record[arm].update(stop_effects(kept["bppo"], kept[arm]))
                effects = {k: v for k, v in record[arm].items() if k not in FIELDS}
                print(f"step {step} {arm:20s} vs bppo: {json.dumps(effects)}")
        if step < len(steps):
            continue            # already measured (resume): the engine and schedules still had to see the step
        steps.append(record)
        save(args.out, results)
    engine.close()
    return results


def protocol(args, overrides) -> dict:
    return {"config": args.config, "overrides": list(overrides), "arms": list(args.arms)}


def results_path(out: str) -> str:
    """--out is a directory (rollout_cost.json inside) or a .json file (e.g. the committed bench/results copy)."""
    return out if out.endswith(".json") else os.path.join(out, "rollout_cost.json")


def load(out: str) -> dict:
    path = results_path(out)
    return json.load(open(path)) if os.path.isfile(path) else {}


def save(out: str, results: dict) -> None:
    path = results_path(out)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def report(results: dict) -> str:
    steps, arms = results["steps"], results["protocol"]["arms"]
    lines = [f"{len(steps)} steps; config {results['protocol']['config']} {' '.join(results['protocol']['overrides'])}",
             "| arm | rollout s/step | tokens generated | trained | reward-only | stopped | samples | mixed groups "
             "| time / GRPO (mean, min..max) | tokens / GRPO (mean, min..max) |", "|" + "---|" * 10]
    for arm in arms:
        mean = {k: statistics.mean(s[arm][k] for s in steps) for k in FIELDS}
        cells = [arm, f"{mean['seconds']:.1f}"] + [f"{mean[k]:.0f}" for k in FIELDS[1:]]
        for key in ("seconds", "generated"):
            if "grpo" in arms:
                r = [s[arm][key] / s["grpo"][key] for s in steps]
                cells.append(f"{statistics.mean(r):.2f} ({min(r):.2f}..{max(r):.2f})")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    stops = [a for a in arms if any("stopped_matched" in s[a] for s in steps)]
    if stops:
        lines += ["", "| stop arm vs bppo | stopped samples | of which would be correct | their groups' accuracy "
                  "| mean abs change of the pair's advantage | same pairs trained |", "|---|---|---|---|---|---|"]
        for arm in stops:
            rows = [s[arm] for s in steps if "stopped_matched" in s[arm]]
            n = sum(r["stopped_matched"] for r in rows)
            ok = sum(r["stopped_would_be_correct"] for r in rows)
            acc = [r["stopped_groups_accuracy"] for r in rows if r["stopped_groups_accuracy"] is not None]
            lines.append(f"| {arm} | {n} | {ok} ({ok / max(n, 1):.2f}) | "
                         f"{statistics.mean(acc) if acc else float('nan'):.2f} | "
                         f"{statistics.mean(r['pair_adv_abs_shift'] for r in rows):.3f} | "
                         f"{all(r['pairs_same'] for r in rows)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples/configs/smollm2_bppo_cpu.yaml"))
    ap.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default="runs/bench/rollout_cost")
    ap.add_argument("--report", action="store_true", help="print the table from --out (a directory or a .json)")
    args, overrides = ap.parse_known_args()
    args.arms = args.arms.split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unrecognised arguments {bad}: overrides are key=value")
    print(__doc__.split("Measured per arm")[0], flush=True)
    results = load(args.out) if args.report else measure(args, overrides)
    print(report(results))


if __name__ == "__main__":
    main()
