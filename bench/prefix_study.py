"""Which BPPO update makes answers shrink at GRPO's accuracy: screen, explore, confirm (issue 26; the protocol is
docs/benchmarks.md section 8, pre-registered before its first run).

    python bench/prefix_study.py --plan                 # every job in order, done or not, hours left; runs nothing
    python bench/prefix_study.py [--max-hours H]        # runs what is missing, in order; rerun to resume
    python bench/prefix_study.py --analyze-only         # exploration and confirmation tables, plots, decisions

The jobs are head-to-head jobs (bench/head_to_head.py: the same task, config, checks, held-out evaluation, LR and
summary format), in this order:
  repro     bppo seed 3 rerun at the study's code: it must reproduce the committed bench/results/h2h/bppo-s3.json
            step series (samples, generated and trained tokens, loss at every step; the checks) before the
            committed grpo / bppo summaries of seeds 0-3 are reused
  screen    every CANDIDATE at SCREEN_SEEDS (0 and 3, where the half prefix went long)
  explore   the EXPLORE_TOP best screened candidates (rank_candidates) at EXPLORE_SEEDS (1, 2); only the best one
            when the screen trained for more than SCREEN_TRAIN_HOURS_MAX at section 6's speed (the drop rule)
  confirm   the chosen candidate (choose_candidate over seeds 0-3) and grpo at CONFIRM_SEEDS (4-11), today's default
            (bppo) at DEFAULT_SEEDS (4-7): seeds nobody has looked at
  optional  the chosen candidate at 8 prompts per step, seeds 4-7 (run only with --optional, after confirm)
Each phase's jobs are known only once the previous phase's summaries exist (the rules read them); --plan says so.

A long regime: a run whose greedy check length exceeds LONG_TOKENS at any check after step LONG_AFTER (issue 26).

Summaries: bench/results/prefix_study/<job>.json (commit each one); analysis: bench/results/prefix_study/analysis/
{exploration,confirmation}.{json,md,png} and decision.json. Run directories: runs/prefix_study (scratch).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import head_to_head as h2h  # noqa: E402

# ------------------------------------------------------------------------------------------ the protocol
# Pre-registered in docs/benchmarks.md section 8: the task, checks, held-out set, LR and analysis of section 6.
CANDIDATES = {                                    # a prefix rule plus a pair weighting (docs/algorithm.md 5, 3, 12)
    "full": ["algorithm.name=bppo", "algorithm.prefix=full"],
    "pair": ["algorithm.name=bppo", "algorithm.prefix=pair"],
    "half_contrast": ["algorithm.name=bppo", "algorithm.pair_weighting=contrast"],
    "full_contrast": ["algorithm.name=bppo", "algorithm.prefix=full", "algorithm.pair_weighting=contrast"],
    "to_correct": ["algorithm.name=bppo", "algorithm.prefix=to_correct"],
}
ARMS = {"grpo": h2h.ARMS["grpo"], "bppo": h2h.ARMS["bppo"], **CANDIDATES}
OPTIONAL_ARMS = {f"{name}_p8": [*over, "data.prompts_per_step=8"] for name, over in CANDIDATES.items()}
ALL_ARMS = {**ARMS, **OPTIONAL_ARMS}
# every arm but grpo runs at BPPO's swept LR (2e-5; grpo: 1e-5), as section 6's one-key changes of BPPO did
PROTOCOL = dict(h2h.PROTOCOL, lr_from={a: "bppo" for a in ALL_ARMS if a not in ("grpo", "bppo")})
LR_OF = lambda arm: PROTOCOL["lr_from"].get(arm, arm)     # noqa: E731 -- whose sweep sets an arm's LR
SCREEN_SEEDS = [0, 3]
EXPLORE_SEEDS = [1, 2]
EXPLORE_TOP = 2
SCREEN_TRAIN_HOURS_MAX = 5.0        # the drop rule: training hours of the 10 screen jobs at section 6's speed
CONFIRM_SEEDS = list(range(4, 12))
DEFAULT_SEEDS = [4, 5, 6, 7]
LONG_TOKENS = 100
LONG_AFTER = 10
REPRO = ("repro-bppo-s3", "bppo", 3)
COMMITTED = f"{REPRO[1]}-s{REPRO[2]}:committed"   # the committed run the reproduction reruns (load_all adds it)
REUSED = [f"{a}-s{s}" for a in ("grpo", "bppo") for s in (0, 1, 2, 3)]   # from bench/results/h2h, after REPRO
# hours per job, docs/benchmarks.md section 8's budget: (expected, upper) from section 6's measured wall times
HOURS = {"grpo": (0.70, 0.82), "bppo": (0.55, 0.65), "candidate": (0.50, 0.80)}
REPRODUCED_KEYS = ("samples", "rollout/tokens_generated", "selected/tokens", "loss")


# ------------------------------------------------------------------------------------------ the rules
def is_long(summary) -> bool:
    """The long regime: a greedy check longer than LONG_TOKENS after step LONG_AFTER."""
    return any(c["step"] > LONG_AFTER and (c["length_mean"] or 0) > LONG_TOKENS for c in summary["checks"])


def final_pass(summary) -> float:
    return summary["final"]["greedy"]["pass@1"]


def rank_candidates(summaries, seeds):
    """Candidates with every one of `seeds` done, best first: fewer long seeds, then higher mean final pass@1, then
    the name (a fixed order for exact ties)."""
    rows = []
    for name in CANDIDATES:
        runs = [summaries.get(f"{name}-s{sd}") for sd in seeds]
        if all(runs):
            rows.append((sum(is_long(r) for r in runs), -statistics.fmean(final_pass(r) for r in runs), name))
    return [name for _, _, name in sorted(rows)]


def machine_speed(summaries) -> float:
    """This study's machine time per section 6 machine time: the reproduction's training seconds over the
    committed run's (the same samples and tokens at every step, so the ratio is the machines' speed)."""
    repro, committed = summaries.get(REPRO[0]), summaries.get(COMMITTED)
    return repro["train_seconds"] / committed["train_seconds"] if repro and committed else 1.0


def screen_train_hours(summaries) -> float:
    """The screen's training hours (metrics.jsonl's time/step, summed over every launch of a resumed job) at
    section 6's machine speed."""
    names = [f"{c}-s{sd}" for c in CANDIDATES for sd in SCREEN_SEEDS]
    return sum(summaries[n]["train_seconds"] for n in names) / machine_speed(summaries) / 3600


def explored(summaries):
    """The EXPLORE_TOP best screened candidates, or only the best one when the screen trained for more than
    SCREEN_TRAIN_HOURS_MAX at section 6's speed (the drop rule); None until the whole screen is done."""
    if any(f"{c}-s{sd}" not in summaries for c in CANDIDATES for sd in SCREEN_SEEDS):
        return None
    top = EXPLORE_TOP if screen_train_hours(summaries) <= SCREEN_TRAIN_HOURS_MAX else 1
    return rank_candidates(summaries, SCREEN_SEEDS)[:top]


def choose_candidate(summaries):
    """The chosen candidate: the best of the explored ones over seeds 0-3 (None until they are all done)."""
    top = explored(summaries)
    seeds = SCREEN_SEEDS + EXPLORE_SEEDS
    if top is None or any(f"{c}-s{sd}" not in summaries for c in top for sd in seeds):
        return None
    return [c for c in rank_candidates(summaries, seeds) if c in top][0]


def decide(summaries, chosen):
    """Issue 26's decision, from the confirmation seeds alone: the chosen candidate becomes BPPO's default if its
    mean final pass@1 minus bppo's, paired over DEFAULT_SEEDS, is > 0 AND its long-regime rate over CONFIRM_SEEDS
    is below bppo's over DEFAULT_SEEDS (or both are 0). None until every confirmation job is done."""
    need = [f"{chosen}-s{s}" for s in CONFIRM_SEEDS] + [f"bppo-s{s}" for s in DEFAULT_SEEDS]
    if chosen is None or any(n not in summaries for n in need):
        return None
    diff = [final_pass(summaries[f"{chosen}-s{s}"]) - final_pass(summaries[f"bppo-s{s}"]) for s in DEFAULT_SEEDS]
    long_c = sum(is_long(summaries[f"{chosen}-s{s}"]) for s in CONFIRM_SEEDS)
    long_b = sum(is_long(summaries[f"bppo-s{s}"]) for s in DEFAULT_SEEDS)
    rate_c, rate_b = long_c / len(CONFIRM_SEEDS), long_b / len(DEFAULT_SEEDS)
    accuracy = statistics.fmean(diff) > 0
    length = rate_c < rate_b or rate_c == rate_b == 0
    return {"chosen": chosen, "accuracy_diff_vs_bppo": h2h.mean_ci(diff), "beats_on_accuracy": accuracy,
            "long_seeds": {chosen: f"{long_c}/{len(CONFIRM_SEEDS)}", "bppo": f"{long_b}/{len(DEFAULT_SEEDS)}"},
            "beats_on_long_regime": length, "becomes_default": accuracy and length}


# ------------------------------------------------------------------------------------------ jobs
def repro_state(summaries):
    """'pending' (no reproduction yet), 'reproduced' (the committed seeds 0-3 are reused) or 'failed' (the study
    reruns grpo and bppo at seeds 0-3 itself: section 8.4)."""
    repro, committed = summaries.get(REPRO[0]), summaries.get(COMMITTED)
    if repro is None:
        return "pending"
    return "reproduced" if committed is not None and not reproduces(repro, committed) else "failed"


def study_jobs(summaries, optional=False):
    """[(name, kind, arm, seed, None)] known now, in launch order, and the first phase still waiting on an
    earlier one's results (None when every phase is known)."""
    out = [(REPRO[0], "main", REPRO[1], REPRO[2], None)]
    state = repro_state(summaries)
    if state == "pending":
        return out, "screen"
    if state == "failed":                                # no reuse: the study runs its own seeds 0-3
        out += [(n, "main", n.split("-s")[0], int(n.split("-s")[1]), None) for n in REUSED]
    out += [(f"{c}-s{s}", "main", c, s, None) for s in SCREEN_SEEDS for c in CANDIDATES]
    top = explored(summaries)
    if top is None:
        return out, "explore"
    out += [(f"{c}-s{s}", "main", c, s, None) for s in EXPLORE_SEEDS for c in top]
    chosen = choose_candidate(summaries)
    if chosen is None:
        return out, "confirm"
    for s in CONFIRM_SEEDS:                              # seed-major: an interrupted phase has complete pairs
        out += [(f"{chosen}-s{s}", "main", chosen, s, None), (f"grpo-s{s}", "main", "grpo", s, None)]
        if s in DEFAULT_SEEDS:
            out.append((f"bppo-s{s}", "main", "bppo", s, None))
    if optional:
        out += [(f"{chosen}_p8-s{s}", "main", f"{chosen}_p8", s, None) for s in DEFAULT_SEEDS]
    return out, None


def job_hours(job):
    arm = job[2]
    return HOURS["grpo" if arm == "grpo" else "bppo" if arm == "bppo" else "candidate"]


def load_all(results, h2h_results):
    """The study's summaries plus, from bench/results/h2h: base and the LR sweep always, the committed run that
    the reproduction reruns (as '<name>:committed'), and REUSED only once the reproduction succeeded."""
    summaries = h2h.load_summaries(results)
    committed = h2h.load_summaries(h2h_results)
    for name, s in committed.items():
        if s["kind"] in ("base", "lr"):
            summaries.setdefault(name, s)
    repro_of = COMMITTED.split(":")[0]
    if repro_of in committed:
        summaries[COMMITTED] = committed[repro_of]
    if repro_state(summaries) == "reproduced":
        for name in REUSED:
            if name in committed:
                summaries.setdefault(name, committed[name])
    return summaries


def reproduces(rerun, committed, keys=REPRODUCED_KEYS):
    """The rerun's step series equals the committed one on `keys` at every step, and its checks agree: the list of
    differences (empty: reproduced)."""
    diffs = []
    a, b = rerun["step_series"], committed["step_series"]
    if len(a) != len(b):
        diffs.append(f"steps: {len(a)} vs {len(b)}")
    if len(rerun["checks"]) != len(committed["checks"]):
        diffs.append(f"checks: {len(rerun['checks'])} vs {len(committed['checks'])}")
    for x, y in zip(a, b):
        for k in keys:
            if x.get(k) != y.get(k):
                diffs.append(f"step {x['step']} {k}: {x.get(k)} vs {y.get(k)}")
    for x, y in zip(rerun["checks"], committed["checks"]):
        if (x["step"], x["accuracy"], x["length_mean"]) != (y["step"], y["accuracy"], y["length_mean"]):
            diffs.append(f"check @{x['step']}: {x['accuracy']}/{x['length_mean']} vs {y['accuracy']}/"
                         f"{y['length_mean']}")
    return diffs


# ------------------------------------------------------------------------------------------ analysis
def analysis(summaries, out_dir):
    """Exploration (seeds 0-3, against the reused grpo / bppo) and confirmation (seeds 4-11) tables, plots and the
    rules' outcomes; writes out_dir/{exploration,confirmation}.{json,md,png} and decision.json."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    repro = summaries.get(REPRO[0])
    committed = summaries.get(COMMITTED)
    result = {"repro": None if repro is None or committed is None else reproduces(repro, committed),
              "machine_speed": machine_speed(summaries), "screen_ranking": rank_candidates(summaries, SCREEN_SEEDS),
              "explored": explored(summaries), "chosen": choose_candidate(summaries)}
    if result["explored"] is not None:
        result["screen_train_hours_at_section6_speed"] = screen_train_hours(summaries)
    result["decision"] = decide(summaries, result["chosen"])
    texts = []
    for phase, seeds in (("exploration", SCREEN_SEEDS + EXPLORE_SEEDS), ("confirmation", CONFIRM_SEEDS)):
        protocol = dict(PROTOCOL, seeds=sorted(seeds))
        picked = {k: v for k, v in summaries.items() if ":" not in k and k != REPRO[0]
                  and (v["kind"] in ("base", "lr") or (v["kind"] == "main" and v["seed"] in seeds))}
        res = h2h.analyze(picked, protocol, list(ALL_ARMS))
        res["long_seeds"] = {a: {"long": sum(is_long(picked[f"{a}-s{s}"]) for s in seeds if f"{a}-s{s}" in picked),
                                 "seeds": sum(f"{a}-s{s}" in picked for s in seeds)} for a in ALL_ARMS}
        with open(os.path.join(out_dir, f"{phase}.json"), "w") as f:
            json.dump(res, f, indent=1)
        text = (f"# {phase} (seeds {protocol['seeds']})\n\nLong regime (check length > {LONG_TOKENS} after step "
                f"{LONG_AFTER}), seeds: " + ", ".join(f"{a} {v['long']}/{v['seeds']}"
                                                      for a, v in res["long_seeds"].items() if v["seeds"])
                + "\n\n" + h2h.tables(res))
        with open(os.path.join(out_dir, f"{phase}.md"), "w") as f:
            f.write(text)
        if res["runs"]:
            h2h.plot(res, os.path.join(out_dir, f"{phase}.png"), list(ALL_ARMS))
        texts.append(text)
    with open(os.path.join(out_dir, "decision.json"), "w") as f:
        json.dump(result, f, indent=1)
    texts.append(f"repro differences: {result['repro']}\nscreen ranking: {result['screen_ranking']}\nexplored: "
                 f"{result['explored']}\nchosen: {result['chosen']}\ndecision: {result['decision']}")
    return result, "\n".join(texts)


# ------------------------------------------------------------------------------------------ driver
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="bench/results/prefix_study")
    p.add_argument("--h2h-results", default="bench/results/h2h", help="the reused summaries (section 6)")
    p.add_argument("--runs", default="runs/prefix_study")
    p.add_argument("--model", default="")
    p.add_argument("--max-hours", type=float, default=None, help="launch no job after this many hours")
    p.add_argument("--only", default="", help="run only these jobs (comma-separated names), in study order")
    p.add_argument("--optional", action="store_true", help="include the optional 8-prompt arm after confirm")
    p.add_argument("--dump-batches", action="store_true", help="train.dump_batches=true (bench/pair_diagnostics.py)")
    p.add_argument("--plan", action="store_true")
    p.add_argument("--analyze-only", action="store_true")
    args = p.parse_args(argv)
    absolute = lambda x: x if os.path.isabs(x) else os.path.join(ROOT, x)
    results, runs = absolute(args.results), absolute(args.runs)
    os.makedirs(results, exist_ok=True)
    summaries = load_all(results, absolute(args.h2h_results))
    if args.analyze_only:
        _, text = analysis(summaries, os.path.join(results, "analysis"))
        print(text)
        return 0
    only = set(args.only.split(",")) if args.only else None
    todo, waiting = study_jobs(summaries, args.optional)
    if only is not None:
        todo = [j for j in todo if j[0] in only]
    if args.plan:
        left = [j for j in todo if j[0] not in summaries]
        for j in todo:
            print(f"{j[0]:24s} {job_hours(j)[0]:.2f} h (upper {job_hours(j)[1]:.2f})"
                  + ("  done" if j[0] in summaries else ""))
        print(f"[study] {len(todo) - len(left)}/{len(todo)} known jobs done; {sum(job_hours(j)[0] for j in left):.1f}"
              f" h expected, {sum(job_hours(j)[1] for j in left):.1f} h at most"
              + (f"; phase '{waiting}' and later wait on the results before it" if waiting else "")
              + f" (hours at section 6's speed; the reproduction ran {machine_speed(summaries):.2f}x its time)")
        return 0
    from megatron_bppo.model.smollm2 import model_dir_or_default

    model = model_dir_or_default(args.model)
    deadline = None if args.max_hours is None else time.time() + 3600 * args.max_hours
    tried = set()
    while True:                     # re-planned after every job: a finished phase decides the next one's jobs
        todo, waiting = study_jobs(summaries, args.optional)
        job = next((j for j in todo if j[0] not in summaries and j[0] not in tried
                    and (only is None or j[0] in only)), None)
        if job is None:
            print("[study] nothing left to run" + (f" until phase '{waiting}' can be planned" if waiting else ""),
                  flush=True)
            break
        if deadline is not None and time.time() > deadline:
            print(f"[study] --max-hours reached: stopping before {job[0]}; rerun to continue", flush=True)
            break
        tried.add(job[0])
        chosen = h2h.select_lrs(summaries, PROTOCOL, [job[2]])
        if job[2] not in chosen:
            print(f"[study] {job[0]}: the LR sweep for {LR_OF(job[2])} is not in the results; skipped", flush=True)
            continue
        print(f"[study] {job[0]}: running at lr {chosen[job[2]][0]}", flush=True)
        started = time.time()
        code, status = h2h.run_job(job, PROTOCOL, model, runs, results, chosen, args.dump_batches, ALL_ARMS)
        print(f"[study] {job[0]}: {status} in {time.time() - started:.0f}s", flush=True)
        if code != 0:
            return code
        summaries = load_all(results, absolute(args.h2h_results))
    _, text = analysis(summaries, os.path.join(results, "analysis"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
