"""What BPPO's update trains, step by step, on a run's own samples, and what each candidate update would train
(issue 26's diagnosis; docs/algorithm.md section 12 derives the length pressure this script measures).

    python bench/pair_diagnostics.py [NAME=]RUN_DIR ... [--json OUT]

Input: runs trained with train.dump_batches=true (batches/step_*.pt, config.json and metrics.jsonl in RUN_DIR;
`bench/head_to_head.py --dump-batches` writes them). Every number comes from the dumped groups through the
trainer's own functions (batch.build_update_batch with the run's algorithm settings and step seed, plus each
candidate's overrides: bench/prefix_study.py's CANDIDATES), so a replayed candidate trains exactly
what the trainer would on those samples; the replay of the run's own update is checked against the dump (the same
sequences, prefix lengths and advantages) at every step.

Per step, for the update the run used:
  solve rate       mean over the step's groups of the share of correct samples (all groups; and mixed only)
  A+, A-, A+ + A-  the trained pair's advantages (after pair weighting), mean over mixed groups
  shorter          share of pairs whose incorrect member is the shorter one (L- < L+; ties count as not shorter)
  correct member   share whose trained prefix contains the final answer (the prefix alone extracts the same answer
                   as the whole completion with the gsm8k reward's extraction, so the reward would score it
                   correct; the reward's last-number fallback makes a cut prefix count when its last number
                   happens to equal the answer) and share that contains its EOS
  incorrect member the same two shares (its wrong final answer, its EOS)
  pressure         the length pressure Pi = sum over trained sequences of A_i (h k_i - e_i) (section 12: the sign
                   of the first-order change of the expected length under a geometric-length policy; > 0
                   lengthens), per mixed group; h = the step's finished samples / its generated tokens (the
                   geometric fit with capped samples censored), k_i the trained tokens, e_i = 1 when the trained
                   tokens end in an EOS token (the engine's set, rollout.engine.eos_token_ids)
and for each candidate replayed on the same groups: its pressure per mixed group and its trained response tokens
against the pairs' full response tokens (the learner savings), and GRPO's pressure (every sample whole).

The check of the derivation: per run, the correlation over steps between the as-run pressure at step t and the
change of the mean sampled length from step t to t + 1, and the share of steps where their signs agree; and the
same between consecutive checks (the pressure summed over the steps between them against the change of the greedy
check length, measured on the same held-out prompts each time).
"""
import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the package
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # bench/prefix_study.py

from megatron_bppo.batch import ADVANTAGE, Group, build_update_batch, dense, prefix_rule  # noqa: E402
from megatron_bppo.config import load_config  # noqa: E402
from megatron_bppo.metrics import read_metrics  # noqa: E402
from megatron_bppo.rewards.extract import extract_answer, normalize_number  # noqa: E402
from megatron_bppo.rollout.engine import Completion, eos_token_ids  # noqa: E402
from megatron_bppo.seeds import rollout_step_seed  # noqa: E402
from prefix_study import CANDIDATES as STUDY_CANDIDATES  # noqa: E402

# The updates replayed on every step: the run's own ("as run"; BPPO's default for a default run), then issue 26's
# candidates (bench/prefix_study.py), as overrides of the run's algorithm section.
CANDIDATES = {"as run": [], **STUDY_CANDIDATES}
GSM8K_ORDER = ("hash", "boxed", "last_number")      # the gsm8k reward's extraction order (rewards/math.py)


def algorithm_configs(run_dir: str, candidates) -> dict:
    """name -> the run's algorithm section (its saved config.json, which JSON makes valid YAML for the trainer's
    own loader) plus the candidate's overrides, validated as the trainer would."""
    path = os.path.join(run_dir, "config.json")
    return {name: load_config(path, list(overrides)).algorithm for name, overrides in candidates.items()}


def load_groups(dump) -> list[Group]:
    groups = []
    for gi, g in enumerate(dump["groups"]):
        completions = [Completion(gi, list(t), "", torch.zeros(len(t)), "stop", i)
                       for i, t in enumerate(g["completions"])]
        groups.append(Group(str(gi), list(g["prompt_ids"]), "", completions, [float(r) for r in g["rewards"]],
                            [bool(c) for c in g["correct"]]))
    return groups


def answer_of(tokenizer, ids) -> str:
    ex = extract_answer(tokenizer.decode(ids, skip_special_tokens=True), order=GSM8K_ORDER)
    return None if ex.answer is None else (normalize_number(ex.answer) or ex.answer)


def ends_in_eos(tokens, k, eos_ids) -> bool:
    """The first k tokens of a completion are the whole completion and end in an EOS token."""
    return bool(tokens) and k == len(tokens) and tokens[-1] in eos_ids


def stop_hazard(groups, eos_ids) -> float:
    """h of the geometric-length fit with capped samples censored: finished samples / generated tokens."""
    samples = [c.token_ids for g in groups for c in g.completions]
    tokens = sum(len(t) for t in samples)
    return sum(ends_in_eos(t, len(t), eos_ids) for t in samples) / tokens if tokens else 0.0


def pressure(batch, groups, eos_ids, h) -> float:
    """Pi = sum over the batch's sequences of A_i (h k_i - e_i)  (docs/algorithm.md section 12)."""
    total = 0.0
    for f, k, (gi, ci) in zip(batch.fields, batch.keep_lengths, batch.origin):
        e = float(ends_in_eos(groups[gi].completions[ci].token_ids, k, eos_ids))
        total += float(f[ADVANTAGE][0]) * (h * k - e)
    return total


def grpo_pressure(groups, algo, eos_ids, h) -> float:
    grpo = dataclasses.replace(algo, name="grpo", selector="all", prefix="full", pair_weighting="none")
    return pressure(build_update_batch(groups, grpo, prefix_rule(grpo), step=1), groups, eos_ids, h)


def check_replay(batch, dump, step):
    """The replayed update of the run trains what the run trained (its dumped sequences, prefixes, advantages)."""
    same = (batch.origin == [tuple(o) for o in dump["origin"]] and batch.keep_lengths == list(dump["keep"])
            and [s.tolist() for s in batch.sequences] == dump["sequences"]
            and all(abs(float(f[ADVANTAGE][0]) - a) < 1e-6 for f, a in zip(batch.fields, dump["adv"])))
    if not same:
        raise SystemExit(f"step {step}: replaying the run's update does not give the dumped batch (other code or "
                         "settings than the run's?)")


def diagnose_step(groups, algo, candidates: dict, step, step_seed, tokenizer, eos_ids, dump=None) -> dict:
    """One dumped step: `algo` the run's algorithm section, `candidates` name -> algorithm section to replay."""
    _, correct, lengths, valid = dense(groups)
    n = valid.sum(1).clamp(min=1)
    p = correct.sum(1) / n
    mixed = (p > 0) & (p < 1)
    mean_length = float(lengths[valid].float().mean())
    h = stop_hazard(groups, eos_ids)
    batch = build_update_batch(groups, algo, prefix_rule(algo), step, step_seed)
    if dump is not None:
        check_replay(batch, dump, step)
    row = {"step": step, "groups": len(groups), "mixed": int(mixed.sum()), "samples": int(valid.sum()),
           "sampled_length": mean_length, "stop_hazard": h, "solve_rate": float(p.mean()),
           "solve_rate_mixed": float(p[mixed].mean()) if mixed.any() else None}
    pairs = {}
    for f, k, (gi, ci) in zip(batch.fields, batch.keep_lengths, batch.origin):
        pairs.setdefault(gi, {})["plus" if groups[gi].correct[ci] else "minus"] = (ci, k, float(f[ADVANTAGE][0]))
    full_pairs = {gi: x for gi, x in pairs.items() if len(x) == 2}       # groups with both members trained
    if full_pairs:
        stats = {"a_plus": [], "a_minus": [], "minus_shorter": [], "plus_answer": [], "plus_eos": [],
                 "minus_answer": [], "minus_eos": [], "length_plus": [], "length_minus": []}
        for gi, x in full_pairs.items():
            comps = groups[gi].completions
            for side in ("plus", "minus"):
                ci, k, a = x[side]
                tokens = comps[ci].token_ids
                stats[f"a_{side}"].append(a)
                stats[f"length_{side}"].append(len(tokens))
                stats[f"{side}_eos"].append(float(ends_in_eos(tokens, k, eos_ids)))
                full_answer = answer_of(tokenizer, tokens)
                stats[f"{side}_answer"].append(float(full_answer is not None
                                                     and answer_of(tokenizer, tokens[:k]) == full_answer))
            stats["minus_shorter"].append(float(stats["length_minus"][-1] < stats["length_plus"][-1]))
        row.update({k: statistics.fmean(v) for k, v in stats.items()})
        row["a_sum"] = row["a_plus"] + row["a_minus"]
    pairs_n = max(int(mixed.sum()), 1)
    row["pressure"] = pressure(batch, groups, eos_ids, h) / pairs_n
    row["grpo_pressure"] = grpo_pressure(groups, algo, eos_ids, h) / pairs_n
    for name, cand in candidates.items():
        cb = build_update_batch(groups, cand, prefix_rule(cand), step, step_seed)
        row[f"cand/{name}/pressure"] = pressure(cb, groups, eos_ids, h) / pairs_n
        row[f"cand/{name}/trained_tokens"] = cb.tokens
        row[f"cand/{name}/pair_tokens"] = cb.counts["selected_response_tokens_full"]
    return row


def correlation(xs, ys):
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else None


def diagnose_run(run_dir: str, candidates=CANDIDATES) -> dict:
    from transformers import AutoTokenizer

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    paths = sorted(glob.glob(os.path.join(run_dir, "batches", "step_*.pt")))
    if not paths:
        raise SystemExit(f"no batches/step_*.pt in {run_dir}: train with train.dump_batches=true")
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["path"])
    eos_ids = eos_token_ids(cfg["model"]["path"], tokenizer) | set(cfg["sampling"].get("stop_token_ids") or [])
    configs = algorithm_configs(run_dir, candidates)
    algo = configs["as run"]
    steps = []
    for path in paths:
        dump, step = torch.load(path, weights_only=True), int(os.path.basename(path)[5:-3])
        steps.append(diagnose_step(load_groups(dump), algo, configs, step,
                                   rollout_step_seed(cfg["sampling"]["seed"], step), tokenizer, eos_ids, dump))
    checks = [{"step": r["step"], "accuracy": r["eval/accuracy"], "length": r.get("eval/response_length/mean")}
              for r in read_metrics(run_dir) if "eval/accuracy" in r]
    by_step = {s["step"]: s for s in steps}
    px, dy = [], []
    for s in steps:
        nxt = by_step.get(s["step"] + 1)
        if nxt is not None:
            px.append(s["pressure"])
            dy.append(nxt["sampled_length"] - s["sampled_length"])
    agree = [(x > 0) == (y > 0) for x, y in zip(px, dy) if x != 0 and y != 0]
    # the same on the checks (the same 64 held-out prompts every time): the pressure summed over the steps between
    # two checks against the change of the greedy check length
    cx, cy = [], []
    for a, b in zip(checks, checks[1:]):
        between = [by_step[t]["pressure"] for t in range(a["step"] + 1, b["step"] + 1) if t in by_step]
        if between and a["length"] is not None and b["length"] is not None:
            cx.append(sum(between))
            cy.append(b["length"] - a["length"])
    check_agree = [(x > 0) == (y > 0) for x, y in zip(cx, cy) if x != 0 and y != 0]
    summary = {"steps": len(steps), "pressure_vs_next_length_change": correlation(px, dy),
               "sign_agreement": statistics.fmean(agree) if agree else None, "sign_pairs": len(agree),
               "check_intervals": [{"pressure_sum": x, "check_length_change": y} for x, y in zip(cx, cy)],
               "pressure_vs_check_length_change": correlation(cx, cy),
               "check_sign_agreement": statistics.fmean(check_agree) if check_agree else None}
    for key in ("a_plus", "a_minus", "a_sum", "minus_shorter", "plus_answer", "plus_eos", "minus_answer",
                "minus_eos", "pressure", "grpo_pressure", "solve_rate"):
        vals = [s[key] for s in steps if s.get(key) is not None]
        summary[key] = statistics.fmean(vals) if vals else None
    for name in candidates:
        trained = sum(s[f"cand/{name}/trained_tokens"] for s in steps)
        full = sum(s[f"cand/{name}/pair_tokens"] for s in steps)
        summary[f"cand/{name}/pressure"] = statistics.fmean(s[f"cand/{name}/pressure"] for s in steps)
        summary[f"cand/{name}/pressure_positive_steps"] = statistics.fmean(
            float(s[f"cand/{name}/pressure"] > 0) for s in steps)
        summary[f"cand/{name}/trained_tokens_per_step"] = trained / len(steps)
        summary[f"cand/{name}/trained_share_of_pair"] = trained / full if full else None
    return {"run_dir": run_dir, "algorithm": cfg["algorithm"], "checks": checks, "summary": summary,
            "steps": steps}


def report(label: str, result: dict) -> str:
    s = result["summary"]
    fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)
    lines = [f"== {label}: {s['steps']} steps; checks (step: pass@1 / length): "
             + " ".join(f"{c['step']}: {c['accuracy']:.2f}/{fmt(c['length'], '.0f')}" for c in result["checks"]),
             "step | mixed | p (mixed) | Lbar 1/h | A+ A- sum | L+ L- | minus shorter | + answer/EOS | - answer/EOS | "
             "pressure (run, grpo) | " + " ".join(f"{n}" for n in CANDIDATES)]
    for r in result["steps"]:
        cand = " ".join(fmt(r[f"cand/{n}/pressure"], "+.2f") for n in CANDIDATES)
        lines.append(f"{r['step']} | {r['mixed']} | {fmt(r['solve_rate'])} ({fmt(r['solve_rate_mixed'])}) | "
                     f"{r['sampled_length']:.0f} {1 / r['stop_hazard'] if r['stop_hazard'] else float('inf'):.0f} | "
                     f"{fmt(r.get('a_plus'))} {fmt(r.get('a_minus'))} "
                     f"{fmt(r.get('a_sum'), '+.2f')} | {fmt(r.get('length_plus'), '.0f')} "
                     f"{fmt(r.get('length_minus'), '.0f')} | {fmt(r.get('minus_shorter'))} | "
                     f"{fmt(r.get('plus_answer'))}/{fmt(r.get('plus_eos'))} | "
                     f"{fmt(r.get('minus_answer'))}/{fmt(r.get('minus_eos'))} | {r['pressure']:+.2f} "
                     f"{r['grpo_pressure']:+.2f} | {cand}")
    lines.append(f"mean: A+ {fmt(s['a_plus'])} A- {fmt(s['a_minus'])} sum {fmt(s['a_sum'], '+.2f')}; incorrect "
                 f"shorter {fmt(s['minus_shorter'])}; correct prefix has answer {fmt(s['plus_answer'])} EOS "
                 f"{fmt(s['plus_eos'])}; incorrect answer {fmt(s['minus_answer'])} EOS {fmt(s['minus_eos'])}; "
                 f"pressure {fmt(s['pressure'], '+.3f')} (GRPO on the same groups {fmt(s['grpo_pressure'], '+.3f')})")
    lines.append(f"derivation check: corr(pressure_t, Lbar_t+1 - Lbar_t) = "
                 f"{fmt(s['pressure_vs_next_length_change'])}, signs agree on {fmt(s['sign_agreement'])} of "
                 f"{s['sign_pairs']} steps; between checks: corr(sum of pressure, check length change) = "
                 f"{fmt(s['pressure_vs_check_length_change'])}, signs agree on {fmt(s['check_sign_agreement'])} of "
                 f"{len(s['check_intervals'])} intervals")
    for n in CANDIDATES:
        lines.append(f"  {n:15s} pressure {s[f'cand/{n}/pressure']:+.3f} (> 0 on "
                     f"{s[f'cand/{n}/pressure_positive_steps']:.2f} of steps); trained tokens/step "
                     f"{s[f'cand/{n}/trained_tokens_per_step']:.0f} = {fmt(s[f'cand/{n}/trained_share_of_pair'])} "
                     f"of the pairs' full tokens")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR or NAME=RUN_DIR")
    ap.add_argument("--json", default="", help="write every number here (the committed diagnostic JSON)")
    args = ap.parse_args(argv)
    out = {"command": "python bench/pair_diagnostics.py " + " ".join(args.runs)
                      + (f" --json {args.json}" if args.json else ""), "candidates": CANDIDATES, "runs": {}}
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        label = label or os.path.basename(os.path.normpath(path))
        out["runs"][label] = diagnose_run(path)
        print(report(label, out["runs"][label]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
