"""GRPO vs BPPO head-to-head, pre-registered (issue 16; the protocol is docs/benchmarks.md section 6).

    python bench/head_to_head.py --plan                  # the jobs, which are done, the hours left; runs nothing
    python bench/head_to_head.py [--phase all|base|lr|main] [--max-hours H] [--seeds 0,1,2,3] [--arms a,b]
                                                          # runs what is missing, in order; rerun to resume
    python bench/head_to_head.py --analyze-only          # tables, paired intervals, plot: bench/results/h2h only
    python bench/head_to_head.py --phase main --arms bppo_fixed --seeds 2,3 --extend   # a pre-registered extension
    python bench/head_to_head.py --phase probe --arms bppo_full --seeds 0   # exploratory, NOT pre-registered:
                                                          # lr_steps steps, checks only, <results>/probes/

Jobs, in order (each a real training job of the CPU config, launched one at a time, as bench/time_to_accuracy.py):
  base        the start model, no training (train.steps=0): the step-0 check and the final held-out evaluation
              shared by every arm (all arms start from the same weights and are evaluated on the same prompts)
  lr-<arm>-<lr>-s<lr_seed>   the LR sweep: lr_steps steps per (arm in lr_arms, lr in lr_grid) on the sweep seed
  <arm>-s<seed>              the arms at their LR (their own sweep's, or BPPO's: lr_from), lr_steps steps,
                             seed-major over the protocol's seeds per arm (arm_seeds)
A job that finished has bench/results/h2h/<job>.json (its summary; the only thing the analysis reads) and is
skipped; an unfinished one resumes from its newest checkpoint (runs/h2h/<job>/checkpoints, every
checkpoint_interval steps). --max-hours stops launching jobs after H hours (a job in flight finishes), so the
sweep can be spread over sessions and machines: commit bench/results/h2h, rerun the same command elsewhere.

Every job: data.seed = data_seed (one train order and one held-out set for all), seed s -> sampling, learner and
rollout seeds; in-run checks: greedy pass@1 on the first check_size held-out prompts every check_interval steps
and after the last step (eval.samples=0); at the end the model is exported (train.export_hf) and evaluated on
all `heldout` held-out prompts by bench/calibrate_task.py --final-eval on 2 ranks (greedy pass@1 per problem and
mean@k at the training temperature, k = final_k), then the export and checkpoints are deleted.

Summary JSON (bench/results/h2h/<job>.json): the protocol, the exact command, git commit (and whether the tree
was dirty), per-check accuracy / length / training seconds, per-step phase times, response length, samples and
tokens, the final evaluation (per-problem greedy verdicts as a 0/1 string, per-problem mean@k counts, lengths).

Analysis (--analyze-only; also after every sweep): the LR sweep table and the LR each arm uses; per-run table;
per arm vs GRPO paired by seed: final greedy pass@1 difference (mean, 95 % t interval over seeds; and a paired
bootstrap over held-out problems of the seed-mean difference), mean@k difference, held-out length ratio
(geometric mean, 95 % t interval on the log ratio), training-time ratio to reach 95 % of GRPO's final check
accuracy (GRPO / arm, > 1 = faster; geometric mean and interval over the seeds where both reached it), step-time
ratio, rollout time and generated-token ratios per step (arm / GRPO; issue 13's measure, descriptive); the
pre-registered success criteria judged from those intervals. Writes <results>/analysis/{analysis.json,
analysis.md, head_to_head.png}.
"""
import argparse
import glob
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from time_to_accuracy import PHASES, run_logged, time_to, train_command  # noqa: E402

# ------------------------------------------------------------------------------------------ the protocol
# Pre-registered in docs/benchmarks.md section 6: change it there first, and only before the runs.
PROTOCOL = {
    "config": "examples/configs/smollm2_bppo_cpu.yaml",
    "task": ["data.train=arithmetic:one_op_25", "data.instruction=cot", "data.train_size=2048",
             "sampling.max_tokens=256", "data.prompts_per_step=4", "algorithm.group_size=8",
             "rollout.schedule=stream", "algorithm.early_stop=off"],
    "data_seed": 0,
    "heldout": 256,              # final evaluation: every held-out prompt
    "final_k": 2,                # mean@k at the training temperature
    "check_size": 64,            # in-run greedy checks: the first CHECK_SIZE held-out prompts
    "check_interval": 5,
    "steps": 40,
    "seeds": [0, 1, 2, 3],
    # seeds per arm, in launch priority within a seed (seed-major); the ablations get 2 seeds in the budget
    "arm_seeds": {"grpo": [0, 1, 2, 3], "bppo": [0, 1, 2, 3], "random_pair": [0, 1, 2, 3],
                  "bppo_fixed": [0, 1], "bppo_literal": [0, 1], "class_total": [0, 1], "stop_as_incorrect": [0, 1],
                  "stop_exclude": [0, 1]},
    "lr_grid": [1e-5, 2e-5, 4e-5],
    "lr_arms": ["grpo", "bppo"],  # swept; every other arm is a one-key change of BPPO and runs at BPPO's LR
    "lr_from": {"bppo_literal": "bppo", "bppo_fixed": "bppo", "random_pair": "bppo", "class_total": "bppo",
                "stop_as_incorrect": "bppo", "stop_exclude": "bppo"},
    "lr_steps": 10,
    "lr_seed": 100,
    "checkpoint_interval": 10,
    "target_fraction": 0.95,     # time to reach this share of GRPO's final check accuracy (mean over seeds)
    "accuracy_margin": 0.03,     # non-inferiority margin on final greedy pass@1 (arm - GRPO)
    "length_ratio_max": 0.7,     # held-out mean length, arm / GRPO
}
# Arms: exact overrides on top of the config and the task (docs/benchmarks.md section 6 says why each exists).
ARMS = {
    "grpo": ["algorithm.name=grpo"],
    "bppo": ["algorithm.name=bppo"],
    "random_pair": ["algorithm.name=bppo", "algorithm.selector=random_pair"],
    "bppo_fixed": ["algorithm.name=bppo", "algorithm.adaptive=false"],
    "bppo_literal": ["algorithm.name=bppo", "algorithm.prefix_min_tokens=1", "algorithm.skip_after=0"],
}
OPTIONAL_ARMS = {"class_total": ["algorithm.name=bppo", "algorithm.pair_weighting=class_total"],
                 "stop_as_incorrect": ["algorithm.name=bppo", "algorithm.early_stop=as_incorrect"],
                 "stop_exclude": ["algorithm.name=bppo", "algorithm.early_stop=exclude"]}
ALL_ARMS = {**ARMS, **OPTIONAL_ARMS}
# Exploratory probes, NOT pre-registered: added after seed 0's BPPO and random_pair runs grew their answers to the
# 256-token cap. The half-prefix cut drops the final answer and EOS of every response longer than the 16-token
# floor (the config's prefix_min_tokens), so these test whether training whole responses removes that.
# `--phase probe` only: lr_steps steps at BPPO's LR (PROBE_LR_FROM), checks only, summaries in <results>/probes/,
# never in the analysis or the criteria.
PROBE_ARMS = {"bppo_full": ["algorithm.name=bppo", "algorithm.prefix=full"],
              "random_pair_full": ["algorithm.name=bppo", "algorithm.selector=random_pair", "algorithm.prefix=full"]}
PROBE_LR_FROM = {arm: "bppo" for arm in PROBE_ARMS}       # kept out of PROTOCOL: it is pre-registered
ARM_OVERRIDES = {**ALL_ARMS, **PROBE_ARMS}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}
STEP_SKIP = ("eval/", "sync/", "timestamp", "step")      # per-step metrics kept: every other numeric one


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


# ------------------------------------------------------------------------------------------ jobs
def jobs(protocol, arms, seeds, phase, extend=False):
    """[(name, kind, arm, seed, lr or None)] in launch order: base, the LR sweep, then seed-major the arms (in
    ARMS order) whose seed list holds the seed; `arms` and `seeds` filter. extend=True: every arm at every one of
    `seeds` (the pre-registered extensions, docs/benchmarks.md section 6.7)."""
    out = []
    if phase in ("all", "base"):
        out.append(("base", "base", None, protocol["seeds"][0], None))
    if phase in ("all", "lr"):
        out += [(f"lr-{a}-{lr_tag(lr)}-s{protocol['lr_seed']}", "lr", a, protocol["lr_seed"], lr)
                for a in protocol["lr_arms"] if a in arms for lr in protocol["lr_grid"]]
    if phase in ("all", "main"):
        out += [(f"{a}-s{s}", "main", a, s, None) for s in seeds for a in ALL_ARMS
                if a in arms and (extend or s in protocol["arm_seeds"].get(a, []))]
    if phase == "probe":
        out += [(f"probe-{a}-s{s}", "probe", a, s, None) for s in seeds for a in PROBE_ARMS if a in arms]
    return out


def load_summaries(results):
    out = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            s = json.load(f)
        out[s["run"]] = s
    return out


def lr_score(summary, protocol):
    """The sweep's selection score: mean check accuracy over the run's checks after step 0 (steps 5 and 10)."""
    checks = [c for c in summary["checks"] if c["step"] > 0]
    return statistics.fmean(c["accuracy"] for c in checks) if checks else float("nan")


def select_lrs(summaries, protocol, arms):
    """arm -> (lr, scores by lr) when the sweep that decides the arm's LR is done (its own, or lr_from's). Rule: the
    highest score; a tie (within one check prompt, 1 / check_size) goes to the smaller LR. Probe arms: BPPO's."""
    chosen = {}
    for arm in arms:
        a = protocol["lr_from"].get(arm) or PROBE_LR_FROM.get(arm, arm)
        scores = {}
        for lr in protocol["lr_grid"]:
            s = summaries.get(f"lr-{a}-{lr_tag(lr)}-s{protocol['lr_seed']}")
            if s:
                scores[lr] = lr_score(s, protocol)
        if len(scores) == len(protocol["lr_grid"]):
            best = max(scores.values())
            lr = min(x for x, v in scores.items() if v >= best - 1.0 / protocol["check_size"] + 1e-12)
            chosen[arm] = (lr, scores)
    return chosen


def git_state():
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def job_steps(protocol, kind) -> int:
    return 0 if kind == "base" else protocol["lr_steps"] if kind in ("lr", "probe") else protocol["steps"]


def job_command(protocol, model, path, kind, arm, seed, lr, dump_batches=False, arm_overrides=None):
    arm_overrides = ARM_OVERRIDES if arm_overrides is None else arm_overrides
    steps = job_steps(protocol, kind)
    overrides = [*protocol["task"], "eval.samples=0", *(["train.dump_batches=true"] if dump_batches else []),
                 f"checkpoint.dir={path}/checkpoints",
                 f"checkpoint.save_interval={protocol['checkpoint_interval']}", "checkpoint.keep_last=1",
                 "checkpoint.allow_fresh_start=true", f"train.export_hf={str(has_final_eval(kind)).lower()}",
                 # sections 6 and 8 ran on the whole-micro-batch logits; chunking (issue 27) changes log-probs in
                 # the last bits and so every trajectory: pinned so every job of both protocols reproduces
                 "learner.logprob_chunk_tokens=0"]
    if kind == "base":
        overrides += ["eval.at_start=false"]            # finish() evaluates once: the step-0 check
    else:
        overrides += ["eval.at_start=false", *arm_overrides[arm], f"optim.lr={lr}"]
    cmd = train_command(model, path, config=protocol["config"], nproc=2, steps=steps,
                        eval_interval=protocol["check_interval"], eval_size=protocol["check_size"], seed=seed,
                        data_seed=protocol["data_seed"], overrides=overrides)
    # train_command turns checkpoints and the export off (time_to_accuracy's runs): later keys win
    return cmd


def has_final_eval(kind) -> bool:
    """base and main jobs end with the held-out evaluation; LR-sweep and probe jobs have their checks only."""
    return kind in ("base", "main")


def final_eval_command(protocol, model, out_json, seed):
    """bench/calibrate_task.py --final-eval on 2 ranks (one engine replica each, as the training job)."""
    from megatron_bppo.distributed import torchrun_command

    return [*torchrun_command(2), os.path.join(ROOT, "bench", "calibrate_task.py"), "--final-eval", out_json,
            "--model", model, "--preset", task_preset(protocol), "--heldout", str(protocol["heldout"]),
            "--samples", str(protocol["final_k"]), "--sampling-seed", str(seed),
            "--data-seed", str(protocol["data_seed"]), "--config", protocol["config"],
            *[o for o in protocol["task"] if not o.startswith("data.train=")]]


def task_preset(protocol):
    return next(o for o in protocol["task"] if o.startswith("data.train=")).split(":", 1)[1]


def summarize_run(name, kind, arm, seed, lr, path, protocol, command, final, wall_s, git, overrides=None):
    """metrics.jsonl (+ the final evaluation) -> the small summary that is committed."""
    from megatron_bppo.metrics import read_metrics

    checks, steps, elapsed = [], [], 0.0
    for r in read_metrics(path):
        if "time/step" in r:
            elapsed += r["time/step"]
            keep = {k: (v if isinstance(v, int) else float(f"{v:.5g}")) for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith(STEP_SKIP)}
            steps.append({"step": r["step"], **keep})
        if "eval/accuracy" in r:
            checks.append({"step": r["step"], "train_seconds": elapsed, "accuracy": r["eval/accuracy"],
                           "length_mean": r.get("eval/response_length/mean"),
                           "length_median": r.get("eval/response_length/median"),
                           "prompts": r.get("eval/prompts")})
    return {"run": name, "kind": kind, "arm": arm, "seed": seed, "lr": lr, "data_seed": protocol["data_seed"],
            "steps": len(steps), "protocol": protocol,
            "overrides": list(ARM_OVERRIDES.get(arm, []) if overrides is None else overrides), "command": command,
            "git": git, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": wall_s,
            "train_seconds": elapsed, "checks": checks, "step_series": steps, "final": final}


def run_job(job, protocol, model, runs_dir, results, chosen, dump_batches=False, arm_overrides=None):
    """One job: train, evaluate (base / main), write <results>/<name>.json. `arm_overrides`: arm -> overrides
    (default: this protocol's ARM_OVERRIDES; bench/prefix_study.py passes its own arms)."""
    name, kind, arm, seed, lr = job
    arm_overrides = ARM_OVERRIDES if arm_overrides is None else arm_overrides
    if kind in ("main", "probe"):         # the arm's chosen LR (select_lrs)
        lr = chosen[arm][0]
    path = os.path.join(runs_dir, name)
    cmd = job_command(protocol, model, path, kind, arm, seed, lr, dump_batches, arm_overrides)
    fresh = not os.path.isdir(os.path.join(path, "checkpoints"))
    started, git = time.time(), git_state()             # the code this launch runs (not the tree at its end)
    code, _ = run_logged(cmd, path, fresh=fresh)
    if code != 0:
        return code, f"training exit {code} (see {path}/train.log)"
    final = None
    if has_final_eval(kind):
        out_json = os.path.join(path, "final_eval.json")
        with open(os.path.join(path, "train.log"), "a") as log:
            ecmd = final_eval_command(protocol, os.path.join(path, "hf"), out_json, seed)
            log.write("$ " + " ".join(ecmd) + "\n")
            log.flush()
            code = subprocess.call(ecmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        if code != 0:
            return code, f"final evaluation exit {code} (see {path}/train.log)"
        with open(out_json) as f:
            final = json.load(f)
        cmd = cmd + ["&&"] + ecmd
    summary = summarize_run(name, kind, arm, seed, lr, path, protocol, cmd, final, time.time() - started, git,
                            arm_overrides.get(arm, []))
    tmp = os.path.join(results, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(results, f"{name}.json"))
    for sub in ("hf", "checkpoints"):                   # hundreds of MB each; the summary is what is kept
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    return 0, "done"


# ------------------------------------------------------------------------------------------ statistics
def t_quantile(df: int) -> float:
    if df in T975:
        return T975[df]
    return T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96


def mean_ci(values):
    """Mean and 95 % t interval over `values` (None for fewer than 2)."""
    values = [v for v in values if v is not None and v == v]
    if not values:
        return None
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1}
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(values)}


def ratio_ci(ratios):
    """Geometric mean and 95 % t interval of positive ratios (on the log scale)."""
    logs = mean_ci([math.log(r) for r in ratios if r is not None and r > 0])
    if logs is None:
        return None
    ex = lambda v: None if v is None else math.exp(v)
    return {"mean": ex(logs["mean"]), "lo": ex(logs["lo"]), "hi": ex(logs["hi"]), "n": logs["n"]}


def bootstrap_problems(pairs, draws=10000, seed=0):
    """Paired bootstrap over held-out problems of the seed-mean difference (arm - reference) in greedy pass@1.
    `pairs`: [(reference bits, arm bits)] per seed, each a '0101...' string over the same problems."""
    if not pairs:
        return None
    n = len(pairs[0][0])
    diff = [[int(a) - int(g) for g, a in zip(gb, ab)] for gb, ab in pairs]      # per seed, per problem
    per_problem = [statistics.fmean(d[i] for d in diff) for i in range(n)]
    rng = random.Random(seed)
    stats = sorted(statistics.fmean(per_problem[rng.randrange(n)] for _ in range(n)) for _ in range(draws))
    return {"mean": statistics.fmean(per_problem), "lo": stats[int(0.025 * draws)], "hi": stats[int(0.975 * draws)],
            "n": n}


def time_to_target(summary, target):
    run = {"evals": [{"step": c["step"], "train_seconds": c["train_seconds"], "accuracy": c["accuracy"]}
                     for c in summary["checks"]]}
    return time_to(run, target)


def with_base(summary, base):
    """A run's checks with the shared step-0 check of the base job in front (no arm evaluates at step 0)."""
    if base and base["checks"] and (not summary["checks"] or summary["checks"][0]["step"] > 0):
        summary = dict(summary, checks=[dict(base["checks"][-1], step=0, train_seconds=0.0), *summary["checks"]])
    return summary


def analyze(summaries, protocol=None, arms=None):
    """`arms`: the arm names in table order (default: this protocol's ALL_ARMS; bench/prefix_study.py passes its
    own, with the reused grpo / bppo summaries among `summaries`)."""
    protocol = protocol or PROTOCOL
    arms = list(ALL_ARMS) if arms is None else list(arms)
    base = summaries.get("base")
    arms_present = [a for a in arms if any(s["kind"] == "main" and s["arm"] == a for s in summaries.values())]
    out = {"protocol": protocol, "lr": {}, "runs": {}, "vs_grpo": {}, "criteria": {}, "vs_bppo": {}}
    chosen = select_lrs(summaries, protocol, arms)
    for a, (lr, scores) in chosen.items():
        out["lr"][a] = {"chosen": lr, "swept_as": protocol["lr_from"].get(a, a),
                        "scores": {lr_tag(k): v for k, v in scores.items()}}
    main = {(s["arm"], s["seed"]): with_base(s, base) for s in summaries.values() if s["kind"] == "main"}
    for (a, seed), s in sorted(main.items()):
        steps = s["step_series"]
        phase = lambda p: statistics.fmean(x.get(f"time/{p}", 0.0) for x in steps) if steps else float("nan")
        fin = s["final"]["greedy"] if s.get("final") else {}
        out["runs"][s["run"]] = {
            "arm": a, "seed": seed, "lr": s["lr"], "steps": s["steps"], "train_seconds": s["train_seconds"],
            "step_seconds": statistics.fmean(x["time/step"] for x in steps) if steps else float("nan"),
            "phase_seconds": {p: phase(p) for p in PHASES},
            "samples_per_step": statistics.fmean(x.get("samples", 0) for x in steps) if steps else float("nan"),
            "generated_tokens_per_step": (statistics.fmean(x["rollout/tokens_generated"] for x in steps)
                                          if steps and all("rollout/tokens_generated" in x for x in steps)
                                          else None),
            "stopped_tokens_per_step": (statistics.fmean(x.get("rollout/tokens_stopped", 0) for x in steps)
                                        if steps else float("nan")),
            "learner_tokens_per_step": (statistics.fmean(x.get("selected/tokens", 0) for x in steps)
                                        if steps else float("nan")),
            "train_length_last_half": (statistics.fmean(x.get("response_length/mean", 0)
                                                        for x in steps[len(steps) // 2:]) if steps else float("nan")),
            "final_accuracy": fin.get("pass@1"), "final_length": fin.get("length", {}).get("mean"),
            "final_mean_at_k": (s["final"].get("mean_at_k") or {}).get("accuracy") if s.get("final") else None,
            "last_check": s["checks"][-1]["accuracy"] if s["checks"] else None,
            "checks": [(c["step"], round(c["train_seconds"], 1), c["accuracy"], c["length_mean"])
                       for c in s["checks"]]}
    grpo_final_check = [main[("grpo", sd)]["checks"][-1]["accuracy"] for sd in protocol["seeds"]
                        if ("grpo", sd) in main and main[("grpo", sd)]["checks"]]
    target = protocol["target_fraction"] * statistics.fmean(grpo_final_check) if grpo_final_check else None
    out["target"] = target
    for a in arms_present:
        entry = paired(main, out["runs"], a, "grpo", protocol["seeds"])
        if entry is None:
            continue
        seeds = entry["seeds"]
        speedups, reached = [], 0
        for sd in seeds:
            tg = time_to_target(main[("grpo", sd)], target) if target is not None else None
            tv = time_to_target(main[(a, sd)], target) if target is not None else None
            reached += tv is not None
            if tg is not None and tv is not None:
                # reached at step 0 (the shared start) counts as one second: the ratio is then meaningless, flagged
                speedups.append(max(tg["seconds"], 1.0) / max(tv["seconds"], 1.0))
        entry["speedup_to_target"] = ratio_ci(speedups)
        entry["reached_target"] = f"{reached}/{len(seeds)}"
        out["vs_grpo"][a] = entry
        if a != "grpo":
            d, lr_ = entry["accuracy_diff"], entry["length_ratio"]
            sp = entry["speedup_to_target"]
            margin, cap = protocol["accuracy_margin"], protocol["length_ratio_max"]
            out["criteria"][a] = {
                "accuracy_non_inferior": None if d is None or d["lo"] is None else d["lo"] > -margin,
                "accuracy_within_margin": (None if d is None or d["lo"] is None
                                           else d["lo"] > -margin and d["hi"] < margin),
                "length_at_most_0.7x": None if lr_ is None or lr_["hi"] is None else lr_["hi"] <= cap,
                "length_point_at_most_0.7x": None if lr_ is None else lr_["mean"] <= cap,
                "faster_to_target": None if sp is None or sp["lo"] is None else sp["lo"] > 1.0,
                "speedup": None if sp is None else sp["mean"]}
    # The ablations' own question (NOT a pre-registered criterion): each one-key change of BPPO against BPPO
    for a in arms_present:
        if protocol["lr_from"].get(a) == "bppo":
            entry = paired(main, out["runs"], a, "bppo", protocol["seeds"])
            if entry is not None:
                out["vs_bppo"][a] = entry
    return out


def paired(main, runs, arm, ref, seeds):
    """`arm` against `ref`, paired by seed over the seeds both ran (None if none): accuracy difference (t interval
    over seeds and bootstrap over problems), and ratios arm / ref of length and rollout cost, ref / arm of step
    time (> 1: the arm is faster)."""
    seeds = [sd for sd in seeds if (arm, sd) in main and (ref, sd) in main]
    if not seeds:
        return None
    r = {sd: runs[main[(ref, sd)]["run"]] for sd in seeds}
    v = {sd: runs[main[(arm, sd)]["run"]] for sd in seeds}
    return {"seeds": seeds,
            "final_accuracy": mean_ci([v[sd]["final_accuracy"] for sd in seeds]),
            "accuracy_diff": mean_ci([v[sd]["final_accuracy"] - r[sd]["final_accuracy"] for sd in seeds]),
            "mean_at_k_diff": mean_ci([(v[sd]["final_mean_at_k"] or 0) - (r[sd]["final_mean_at_k"] or 0)
                                       for sd in seeds]),
            "accuracy_diff_problem_bootstrap": bootstrap_problems(
                [(main[(ref, sd)]["final"]["greedy"]["bits"], main[(arm, sd)]["final"]["greedy"]["bits"])
                 for sd in seeds]),
            "length_ratio": ratio_ci([v[sd]["final_length"] / r[sd]["final_length"] for sd in seeds]),
            "step_time_ratio": ratio_ci([r[sd]["step_seconds"] / v[sd]["step_seconds"] for sd in seeds]),
            # issue 13's rollout measure: arm / ref per step (< 1: a cheaper rollout)
            "rollout_time_ratio": ratio_ci([v[sd]["phase_seconds"]["rollout"] / r[sd]["phase_seconds"]["rollout"]
                                            for sd in seeds]),
            "rollout_token_ratio": ratio_ci([v[sd]["generated_tokens_per_step"] / r[sd]["generated_tokens_per_step"]
                                             for sd in seeds
                                             if v[sd]["generated_tokens_per_step"]
                                             and r[sd]["generated_tokens_per_step"]])}


def fmt_ci(c, digits=3, signed=False):
    if c is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if c.get("lo") is None:
        return f.format(c["mean"]) + " (n=1)"
    return f"{f.format(c['mean'])} [{f.format(c['lo'])}, {f.format(c['hi'])}]"


def tables(result) -> str:
    grid = result["protocol"]["lr_grid"]
    num = lambda v, spec: "n/a" if v is None else format(v, spec)
    lines = ["LR sweep (score: mean check accuracy over the sweep run's checks after step 0; chosen: highest, ties "
             "within one check prompt to the smaller LR):", "",
             "| arm | " + " | ".join(lr_tag(x) for x in grid) + " | chosen |", "|---|" + "---|" * (len(grid) + 1)]
    for a, e in result["lr"].items():
        if e["swept_as"] != a:
            lines.append(f"| {a} | " + " | ".join("" for _ in grid)
                         + f" | {lr_tag(e['chosen'])} (BPPO's) |")
            continue
        scores = " | ".join(f"{e['scores'].get(lr_tag(x), float('nan')):.3f}" for x in grid)
        lines.append(f"| {a} | {scores} | {lr_tag(e['chosen'])} |")
    lines += ["", "| run | lr | steps | train s | s/step | rollout s | learner s | samples/step | "
              "generated tokens/step (stopped early) | learner tokens/step | checks (step: acc) | final pass@1 | "
              "final mean@k | final length | train length (2nd half) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        ph = r["phase_seconds"]
        checks = " ".join(f"{st}:{acc:.2f}" for st, _, acc, _ in r["checks"])
        lines.append(f"| {name} | {lr_tag(r['lr'])} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['step_seconds']:.1f} | {ph['rollout']:.1f} | {ph['logprob'] + ph['update']:.1f} | "
                     f"{r['samples_per_step']:.0f} | {num(r['generated_tokens_per_step'], '.0f')} "
                     f"({r['stopped_tokens_per_step']:.0f}) | {r['learner_tokens_per_step']:.0f} | {checks} | "
                     f"{num(r['final_accuracy'], '.3f')} | {num(r['final_mean_at_k'], '.3f')} | "
                     f"{num(r['final_length'], '.1f')} | {r['train_length_last_half']:.1f} |")
    lines += ["", f"Paired by seed against GRPO (mean [95 % interval]); target = "
              f"{result['protocol']['target_fraction']} x GRPO's mean final check accuracy = "
              f"{num(result.get('target'), '.3f')}:", "", *paired_table(result["vs_grpo"], "GRPO", to_target=True)]
    lines += ["", "Pre-registered criteria (accuracy: lower bound of the diff interval > -margin; length: upper "
              "bound of the ratio interval <= 0.7; speed: lower bound of the speed-up interval > 1):", "",
              "| arm | accuracy non-inferior | within +-margin | length <= 0.7x (interval) | (point) | faster | "
              "speed-up |", "|---|---|---|---|---|---|---|"]
    yn = lambda v: "n/a" if v is None else ("yes" if v else "no")
    for a, c in result["criteria"].items():
        lines.append(f"| {a} | {yn(c['accuracy_non_inferior'])} | {yn(c['accuracy_within_margin'])} | "
                     f"{yn(c['length_at_most_0.7x'])} | {yn(c['length_point_at_most_0.7x'])} | "
                     f"{yn(c['faster_to_target'])} | {num(c['speedup'], '.2f')} |")
    if result.get("vs_bppo"):
        lines += ["", "Each one-key change of BPPO paired by seed against `bppo` (mean [95 % interval]; the ablations' "
                  "own question, NOT a pre-registered criterion):", "", *paired_table(result["vs_bppo"], "bppo")]
    return "\n".join(lines) + "\n"


def paired_table(entries, ref, to_target=False):
    """Markdown rows of paired() entries against `ref` (the GRPO table adds the speed-up to the target)."""
    head = (f"| arm | seeds | final pass@1 | diff vs {ref} (t over seeds) | diff (bootstrap over problems) | "
            f"mean@k diff | length ratio | step-time speed-up | {'speed-up to target [reached] | ' * to_target}"
            f"rollout time ratio | rollout token ratio |")
    rows = [head, "|---" * head.count(" | ") + "|---|"]
    for a, e in entries.items():
        target = f"{fmt_ci(e['speedup_to_target'], 2)} [{e['reached_target']}] | " if to_target else ""
        rows.append(f"| {a} | {len(e['seeds'])} | {fmt_ci(e['final_accuracy'])} | "
                    f"{fmt_ci(e['accuracy_diff'], signed=True)} | "
                    f"{fmt_ci(e['accuracy_diff_problem_bootstrap'], signed=True)} | "
                    f"{fmt_ci(e['mean_at_k_diff'], signed=True)} | {fmt_ci(e['length_ratio'], 2)} | "
                    f"{fmt_ci(e['step_time_ratio'], 2)} | {target}{fmt_ci(e['rollout_time_ratio'], 2)} | "
                    f"{fmt_ci(e['rollout_token_ratio'], 2)} |")
    return rows


def plot(result, path, arms=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(ALL_ARMS if arms is None else arms)
    palette = ("tab:red", "tab:blue", "tab:cyan", "tab:purple", "tab:green", "tab:orange", "tab:brown", "tab:olive",
               "tab:pink", "tab:gray")
    if len(arms) > len(palette):                       # more arms than colors: color only those that ran
        ran = {r["arm"] for r in result["runs"].values()}
        arms = [a for a in arms if a in ran]
    if len(arms) > len(palette):
        raise ValueError(f"{len(arms)} arms ran but {len(palette)} colors: add colors to plot()'s palette")
    colors = dict(zip(arms, palette))                  # one color per arm, fixed by the arm order
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, r in result["runs"].items():
        c = colors[r["arm"]]
        ch = r["checks"]
        axes[0].plot([x[1] / 60 for x in ch], [x[2] for x in ch], "-", color=c, marker="o", ms=3, alpha=0.7,
                     label=r["arm"] if r["seed"] == min(x["seed"] for x in result["runs"].values()
                                                         if x["arm"] == r["arm"]) else None)
        axes[1].plot([x[0] for x in ch], [x[3] for x in ch], "-", color=c, marker="o", ms=3, alpha=0.7)
    if result.get("target") is not None:
        axes[0].axhline(result["target"], color="grey", lw=0.8, ls="--", label="target")
    axes[0].set(xlabel="training time (min, evaluation excluded)", ylabel="check pass@1 (greedy)",
                title="held-out checks vs training time")
    axes[1].set(xlabel="step", ylabel="check mean response length (tokens)", title="response length")
    names = [a for a in result["vs_grpo"] if a != "grpo"]
    for i, a in enumerate(names):
        d = result["vs_grpo"][a]["accuracy_diff"]
        if d is None:
            continue
        lo, hi = (d["lo"], d["hi"]) if d["lo"] is not None else (d["mean"], d["mean"])
        axes[2].errorbar([d["mean"]], [i], xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o",
                         color=colors[a], capsize=4)
    margin = result["protocol"]["accuracy_margin"]
    axes[2].axvline(0, color="black", lw=0.8)
    axes[2].axvspan(-margin, margin, color="grey", alpha=0.15)
    axes[2].set_yticks(range(len(names)), names)
    axes[2].set(xlabel="final greedy pass@1, arm - GRPO (95 % interval over seeds)", title="paired difference")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_analysis(results, protocol=None):
    summaries = load_summaries(results)
    result = analyze(summaries, protocol)
    out = os.path.join(results, "analysis")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = tables(result)
    with open(os.path.join(out, "analysis.md"), "w") as f:
        f.write(text)
    if result["runs"]:
        plot(result, os.path.join(out, "head_to_head.png"))
    return result, text


# ------------------------------------------------------------------------------------------ driver
def estimate_hours(job, protocol, per_step):
    """A rough time per job for --plan (seconds per step by arm, docs/benchmarks.md section 6's budget)."""
    name, kind, arm, seed, lr = job
    if kind == "base":
        return per_step["eval"] / 3600
    steps = job_steps(protocol, kind)
    checks = steps // protocol["check_interval"] + 1
    final = per_step["final_eval"] if has_final_eval(kind) else 0.0
    step_s = per_step[arm if arm in per_step else "bppo"]      # a probe arm: BPPO's (a rough plan)
    return (per_step["startup"] + steps * step_s + checks * per_step["check"] + final) / 3600


# seconds, the upper-bound column of docs/benchmarks.md section 6.7 (responses stay at their start length)
BUDGET = {"grpo": 66.0, "bppo": 32.0, "bppo_literal": 32.0, "bppo_fixed": 34.0, "random_pair": 33.0,
          "class_total": 32.0, "check": 34.0, "startup": 135.0, "final_eval": 312.0, "eval": 480.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", default="all", choices=("all", "base", "lr", "main", "probe"),
                   help="probe: the exploratory PROBE_ARMS (not pre-registered) at --seeds, never in the analysis")
    p.add_argument("--arms", default=None, help=f"of {', '.join(ARM_OVERRIDES)} (each at its protocol "
                                                          "seeds; the probe arms with --phase probe)")
    p.add_argument("--seeds", default=",".join(map(str, PROTOCOL["seeds"])))
    p.add_argument("--max-hours", type=float, default=None, help="launch no job after this many hours")
    p.add_argument("--results", default="bench/results/h2h", help="summaries (committed)")
    p.add_argument("--runs", default="runs/h2h", help="run directories (not kept)")
    p.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--extend", action="store_true",
                   help="run --arms at every one of --seeds, beyond the protocol's seeds per arm (section 6.7)")
    p.add_argument("--plan", action="store_true", help="list the jobs, done or not, and the estimated hours left")
    p.add_argument("--dump-batches", action="store_true",
                   help="also write each step's groups and trained sequences to <runs>/<job>/batches "
                        "(train.dump_batches=true: changes no number; for bench/pair_diagnostics.py)")
    p.add_argument("--analyze-only", action="store_true")
    args = p.parse_args(argv)
    known = PROBE_ARMS if args.phase == "probe" else ALL_ARMS
    args.arms = args.arms.split(",") if args.arms else list(PROBE_ARMS if args.phase == "probe" else ARMS)
    unknown = [a for a in args.arms if a not in known]
    if unknown:
        p.error(f"unknown arm(s) {unknown} for --phase {args.phase}: choose from {', '.join(known)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.results = os.path.join(ROOT, args.results) if not os.path.isabs(args.results) else args.results
    args.runs = os.path.join(ROOT, args.runs) if not os.path.isabs(args.runs) else args.runs
    return args


def main(argv=None):
    args = parse_args(argv)
    results = os.path.join(args.results, "probes") if args.phase == "probe" else args.results
    os.makedirs(results, exist_ok=True)
    if args.analyze_only:
        _, text = write_analysis(args.results)
        print(text)
        print(f"[h2h] wrote {args.results}/analysis/analysis.json, analysis.md, head_to_head.png", flush=True)
        return 0
    todo = jobs(PROTOCOL, args.arms, args.seeds, args.phase, args.extend)
    done = load_summaries(results)
    if args.plan:
        left = 0.0
        for job in todo:
            hours = estimate_hours(job, PROTOCOL, BUDGET)
            state = "done" if job[0] in done else "partial" if os.path.isdir(os.path.join(args.runs, job[0])) else ""
            left += 0.0 if state == "done" else hours
            print(f"{job[0]:28s} {hours:5.2f} h  {state}")
        print(f"[h2h] {sum(j[0] in done for j in todo)}/{len(todo)} done; about {left:.1f} h left (budget: "
              f"docs/benchmarks.md section 6)")
        return 0
    from megatron_bppo.model.smollm2 import model_dir_or_default

    model = model_dir_or_default(args.model)
    deadline = None if args.max_hours is None else time.time() + 3600 * args.max_hours
    for i, job in enumerate(todo, 1):
        name, kind, arm = job[0], job[1], job[2]
        if name in done:
            print(f"[h2h] {i}/{len(todo)} {name}: done earlier, kept", flush=True)
            continue
        if deadline is not None and time.time() > deadline:
            print(f"[h2h] --max-hours reached: stopping before {name}; rerun to continue", flush=True)
            break
        needs_lr = kind in ("main", "probe")
        sweep = load_summaries(args.results) if kind == "probe" else done     # probes keep theirs in probes/
        chosen = select_lrs(sweep, PROTOCOL, [arm]) if needs_lr else {}
        if needs_lr and arm not in chosen:
            print(f"[h2h] {i}/{len(todo)} {name}: the LR sweep for {arm} is not finished; skipped", flush=True)
            continue
        print(f"[h2h] {i}/{len(todo)} {name}: running" + (f" at lr {chosen[arm][0]}" if chosen else ""), flush=True)
        started = time.time()
        code, status = run_job(job, PROTOCOL, model, args.runs, results, chosen, args.dump_batches)
        print(f"[h2h] {i}/{len(todo)} {name}: {status} in {time.time() - started:.0f}s", flush=True)
        if code == 75:               # stopped by a signal after saving: the user wants the sweep to stop
            return code
        done = load_summaries(results)
    _, text = write_analysis(args.results)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
