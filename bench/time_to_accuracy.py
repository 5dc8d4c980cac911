"""Time to accuracy and response length: full training runs of GRPO, BPPO and BPPO ablations from the same start.

    python bench/time_to_accuracy.py [--variants grpo,bppo,bppo_noprefix,bppo_fixed] [--seeds 0,1]
                                     [--steps 8] [--eval-interval 2] [--eval-size 48] [--targets 0.6,0.75]
                                     [--data-seed 0|run] [--out runs/bench/tta] [--analyze-only] [key=value ...]

Each (seed, variant) is one real training job, launched one at a time, seed-major (every variant of seed 0, then
seed 1, ...), exactly as the CPU demo runs (examples/configs/smollm2_bppo_cpu.yaml: SmolLM2-135M-Instruct, DP2,
Megatron learner + vLLM engines, arithmetic:l0_l5_mix):

    torchrun --nproc-per-node 2 -m megatron_bppo.cli train --config <config> model.path=<SmolLM2>
        run_dir=<out>/<variant>-s<seed> train.steps=<steps> eval.interval=<k> data.eval_size=<n>
        sampling.seed=<seed> learner.seed=<seed> rollout.seed=<seed> data.seed=<data seed> <variant overrides>
    --> <out>/<variant>-s<seed>/{metrics.jsonl, summary.json, train.log}

    grpo           algorithm.name=grpo                        all G=8 completions, whole responses, fixed G
    bppo           algorithm.name=bppo                        shortest correct + shortest wrong, prefix, adaptive
    bppo_noprefix  algorithm.name=bppo algorithm.prefix=full  ... without the prefix cut
    bppo_fixed     algorithm.name=bppo algorithm.adaptive=false ... with a fixed G=8 instead of adaptive sampling

data.seed picks the generated train/held-out prompts and their order: --data-seed 0 (default) keeps them the same
for every seed, so only sampling differs and every run starts from the same held-out accuracy; --data-seed run
uses the run's seed (a different held-out set per seed; ratios stay paired within a seed).

A run whose summary.json reports all steps is kept (rerunning the command continues an interrupted sweep); an
unfinished run directory is deleted and the run starts over. Then, from every metrics.jsonl:

    training time  = cumulative `time/step` (sync + rollout + reward + log-probs + update; evaluation excluded)
    time to target = training time at the first evaluation whose held-out greedy accuracy (`eval/accuracy`)
                     reaches the target (each of --targets, and the GRPO runs' final mean accuracy), None if never
    speed-up       = GRPO time to target / variant time to target, paired by seed; mean and min..max over seeds
    step-time ratio= GRPO mean time/step / variant mean time/step, paired by seed (throughput, no eval noise);
                     the same for the learner phases (log-probs + update) and the rollout alone
    length ratio   = variant / GRPO final held-out mean response length, and mean training response length
                     over the last half of the steps, paired by seed
Written to --out: tta.json (every number), tta.md (the tables), tta.png (held-out accuracy vs training time,
held-out and training response length vs step, time per step by phase).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "grpo": ["algorithm.name=grpo"],
    "bppo": ["algorithm.name=bppo"],
    "bppo_noprefix": ["algorithm.name=bppo", "algorithm.prefix=full"],
    "bppo_fixed": ["algorithm.name=bppo", "algorithm.adaptive=false"],
}
PHASES = ("sync", "rollout", "logprob", "update")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="grpo,bppo,bppo_noprefix,bppo_fixed")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=48)
    p.add_argument("--targets", default="0.6,0.75", help="held-out accuracy targets, comma-separated")
    p.add_argument("--config", default="examples/configs/smollm2_bppo_cpu.yaml")
    p.add_argument("--data-seed", default="0", help="data.seed of every run, or 'run' for the run's seed")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/bench/tta")
    p.add_argument("--analyze-only", action="store_true", help="only read the finished runs under --out")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run (key=value)")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    if "grpo" not in args.variants:
        p.error("the variants must include grpo: every ratio is against it")
    return args


def run_dir(args, variant, seed):
    return os.path.join(args.out, f"{variant}-s{seed}")


def finished(path, steps):
    try:
        with open(os.path.join(path, "summary.json")) as f:
            return json.load(f).get("steps") == steps
    except (OSError, ValueError):
        return False


def train_command(model, path, *, config, nproc, steps, eval_interval, eval_size, seed, data_seed, overrides):
    """The torchrun command of one training job (seed -> sampling, learner and rollout seeds)."""
    from megatron_bppo.distributed import torchrun_command

    return [*torchrun_command(nproc), "-m", "megatron_bppo.cli", "train",
            "--config", config, f"model.path={model}", f"run_dir={path}", "checkpoint.dir=",
            f"train.steps={steps}", f"eval.interval={eval_interval}", f"data.eval_size={eval_size}",
            "train.export_hf=false", "train.tensorboard=false",
            *(f"{k}.seed={seed}" for k in ("sampling", "learner", "rollout")),
            f"data.seed={data_seed}", *overrides]


def run_logged(cmd, path, fresh=True):
    """Run `cmd` in ROOT with its output in <path>/train.log (appended when not `fresh`: a resumed job keeps its
    directory and checkpoint). Returns (exit code, seconds)."""
    if fresh and os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    started = time.time()
    with open(os.path.join(path, "train.log"), "w" if fresh else "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return code, time.time() - started


def launch(args, model, variant, seed):
    """One training job (torchrun, 2 ranks); its output goes to <run_dir>/train.log. Returns (exit code, seconds).
    An unfinished run directory is started over (no checkpoint to resume from)."""
    path = run_dir(args, variant, seed)
    cmd = train_command(model, path, config=args.config, nproc=args.nproc, steps=args.steps,
                        eval_interval=args.eval_interval, eval_size=args.eval_size, seed=seed,
                        data_seed=seed if args.data_seed == "run" else int(args.data_seed),
                        overrides=[*VARIANTS[variant], *args.overrides])
    return run_logged(cmd, path)


def load_run(path):
    """metrics.jsonl -> eval curve (step, training seconds so far, accuracy, mean@k, length) and per-step series."""
    from megatron_bppo.metrics import read_metrics

    evals, steps, elapsed = [], [], 0.0
    for r in read_metrics(path):
        if "time/step" in r:
            elapsed += r["time/step"]
            steps.append({"step": r["step"], "time": r["time/step"], "length": r.get("response_length/mean"),
                          "samples": r.get("samples"),
                          "selected_tokens": r.get("selected/tokens", 0),
                          **{p: r.get(f"time/{p}", 0.0) for p in PHASES}})
        if "eval/accuracy" in r:
            mean_at_k = next((v for k, v in r.items() if k.startswith("eval/mean@")), None)
            evals.append({"step": r["step"], "train_seconds": elapsed, "accuracy": r["eval/accuracy"],
                          "mean_at_k": mean_at_k, "length": r.get("eval/response_length/mean"),
                          "median_length": r.get("eval/response_length/median")})
    with open(os.path.join(path, "config.json")) as f:
        data_seed = json.load(f)["data"]["seed"]
    return {"evals": evals, "steps": steps, "data_seed": data_seed}


def time_to(run, target):
    hit = next((e for e in run["evals"] if e["accuracy"] >= target - 1e-9), None)
    return None if hit is None else {"step": hit["step"], "seconds": hit["train_seconds"]}


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def analyze(args, runs):
    """Per-run figures and per-variant ratios against GRPO of the same seed."""
    grpo_final = spread([runs[("grpo", s)]["evals"][-1]["accuracy"] for s in args.seeds if ("grpo", s) in runs])
    targets = {f"{t:.2f}": t for t in args.targets}
    if grpo_final:
        targets["grpo_final"] = grpo_final["mean"]
    per_run = {}
    for (variant, seed), run in runs.items():
        steps, evals = run["steps"], run["evals"]
        half = steps[len(steps) // 2:]
        per_run[f"{variant}-s{seed}"] = {
            "variant": variant, "seed": seed, "data_seed": run["data_seed"], "steps": len(steps),
            "train_seconds": sum(s["time"] for s in steps),
            "step_seconds_mean": statistics.fmean(s["time"] for s in steps),
            "phase_seconds_mean": {p: statistics.fmean(s[p] for s in steps) for p in PHASES},
            "samples_per_step": statistics.fmean(s["samples"] or 0 for s in steps),
            "learner_tokens_per_step": statistics.fmean(s["selected_tokens"] for s in steps),
            "accuracy_before": evals[0]["accuracy"], "accuracy_after": evals[-1]["accuracy"],
            "accuracy_mean_trained": statistics.fmean(e["accuracy"] for e in evals[1:]) if len(evals) > 1 else None,
            "mean_at_k_before": evals[0]["mean_at_k"], "mean_at_k_after": evals[-1]["mean_at_k"],
            "eval_length_before": evals[0]["length"], "eval_length_after": evals[-1]["length"],
            "train_length_last_half": statistics.fmean(s["length"] for s in half),
            "time_to": {name: time_to(run, t) for name, t in targets.items()},
            "evals": evals,
        }
    ratios = {}
    for variant in args.variants:
        paired = [(per_run.get(f"grpo-s{s}"), per_run.get(f"{variant}-s{s}")) for s in args.seeds]
        paired = [(g, v) for g, v in paired if g and v]
        if not paired:
            continue
        phase = lambda r, names: sum(r["phase_seconds_mean"][p] for p in names)
        entry = {"seeds": len(paired),
                 "step_time_ratio": spread([g["step_seconds_mean"] / v["step_seconds_mean"] for g, v in paired]),
                 "learner_time_ratio": spread([phase(g, ("logprob", "update")) / phase(v, ("logprob", "update"))
                                               for g, v in paired]),
                 "rollout_time_ratio": spread([phase(g, ("rollout",)) / phase(v, ("rollout",)) for g, v in paired]),
                 "accuracy_mean_trained": spread([v["accuracy_mean_trained"] for _, v in paired]),
                 "final_accuracy": spread([v["accuracy_after"] for _, v in paired]),
                 "final_mean_at_k": spread([v["mean_at_k_after"] for _, v in paired]),
                 "eval_length_ratio": spread([v["eval_length_after"] / g["eval_length_after"] for g, v in paired]),
                 "train_length_ratio": spread([v["train_length_last_half"] / g["train_length_last_half"]
                                               for g, v in paired]),
                 "learner_token_ratio": spread([v["learner_tokens_per_step"] / g["learner_tokens_per_step"]
                                                for g, v in paired])}
        for name in targets:
            speedups, reached = [], 0
            for g, v in paired:
                tg, tv = g["time_to"][name], v["time_to"][name]
                reached += tv is not None
                if tg is not None and tv is not None and tv["seconds"] > 0:
                    speedups.append(tg["seconds"] / tv["seconds"])
            entry[f"speedup_to_{name}"] = spread(speedups)
            entry[f"reached_{name}"] = f"{reached}/{len(paired)}"
        ratios[variant] = entry
    return {"targets": targets, "runs": per_run, "vs_grpo": ratios}


def fmt(s, digits=2):
    if s is None:
        return "n/a"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def tables(result):
    t = result["targets"]
    reach = lambda hit: "not reached" if hit is None else f"{hit['step']} ({hit['seconds']:.0f})"
    lines = ["| run | data seed | steps | train s | s/step | rollout s | learner s | samples/step | "
             "learner tokens/step | acc before -> after | mean@2 after | eval length before -> after | "
             "train length (2nd half) | "
             + " | ".join(f"to {k}: step (s)" for k in t) + " |", "|" + "---|" * (13 + len(t))]
    for name, r in sorted(result["runs"].items()):
        lines.append(
            f"| {name} | {r['data_seed']} | {r['steps']} | {r['train_seconds']:.0f} | {r['step_seconds_mean']:.1f} | "
            f"{r['phase_seconds_mean']['rollout']:.1f} | "
            f"{r['phase_seconds_mean']['logprob'] + r['phase_seconds_mean']['update']:.1f} | "
            f"{r['samples_per_step']:.0f} | {r['learner_tokens_per_step']:.0f} | "
            f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | {r['mean_at_k_after']:.3f} | "
            f"{r['eval_length_before']:.1f} -> {r['eval_length_after']:.1f} | {r['train_length_last_half']:.1f} | "
            + " | ".join(reach(r["time_to"][k]) for k in t) + " |")
    targets = " | ".join(f"speed-up to {v:.3f} ({k}) [reached]" for k, v in t.items())
    lines += ["", "Ratios are GRPO / variant for times (> 1: the variant is faster) and variant / GRPO for lengths and "
              "tokens, paired by seed: mean (min..max over seeds).", "",
              f"| variant | seeds | step-time ratio | learner-time ratio | rollout-time ratio | {targets} | "
              "final acc | mean acc (evals after step 0) | final mean@2 | eval length ratio | train length ratio | "
              "learner tokens ratio |", "|" + "---|" * (11 + len(t))]
    for variant, e in result["vs_grpo"].items():
        speed = " | ".join(f"{fmt(e[f'speedup_to_{k}'])} [{e[f'reached_{k}']}]" for k in t)
        lines.append(f"| {variant} | {e['seeds']} | {fmt(e['step_time_ratio'])} | {fmt(e['learner_time_ratio'])} | "
                     f"{fmt(e['rollout_time_ratio'])} | {speed} | {fmt(e['final_accuracy'], 3)} | "
                     f"{fmt(e['accuracy_mean_trained'], 3)} | {fmt(e['final_mean_at_k'], 3)} | "
                     f"{fmt(e['eval_length_ratio'])} | {fmt(e['train_length_ratio'])} | "
                     f"{fmt(e['learner_token_ratio'], 3)} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in sorted(result["runs"].items()):
        c, style = colors[r["variant"]], ("-", "--", ":", "-.")[r["seed"] % 4]
        label = name
        ev = r["evals"]
        axes[0].plot([e["train_seconds"] / 60 for e in ev], [e["accuracy"] for e in ev], style, color=c, marker="o",
                     label=label)
        axes[1].plot([e["step"] for e in ev], [e["length"] for e in ev], style, color=c, marker="o", label=label)
    for target in result["targets"].values():
        axes[0].axhline(target, color="grey", lw=0.8)
    axes[0].set(xlabel="training time (min, eval excluded)", ylabel="held-out pass@1 (greedy)",
                title="accuracy vs training time")
    axes[1].set(xlabel="step", ylabel="held-out mean response length (tokens)", title="response length")
    variants = list(result["vs_grpo"])
    bottom = [0.0] * len(variants)
    for phase in PHASES:
        vals = [statistics.fmean(r["phase_seconds_mean"][phase] for r in result["runs"].values() if r["variant"] == v)
                for v in variants]
        axes[2].bar(variants, vals, bottom=bottom, label=phase)
        bottom = [b + x for b, x in zip(bottom, vals)]
    axes[2].set(ylabel="seconds per step (mean over seeds)", title="time per step by phase")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    if not args.analyze_only:
        from megatron_bppo.model.smollm2 import prepare_smollm2

        model = str(prepare_smollm2())
        for i, (variant, seed) in enumerate(jobs, 1):
            path = run_dir(args, variant, seed)
            if finished(path, args.steps):
                print(f"[tta] {i}/{len(jobs)} {variant} seed {seed}: finished earlier, kept ({path})", flush=True)
                continue
            print(f"[tta] {i}/{len(jobs)} {variant} seed {seed}: training {args.steps} steps -> {path}", flush=True)
            code, seconds = launch(args, model, variant, seed)
            status = "done" if code == 0 and finished(path, args.steps) else f"FAILED (exit {code}, see train.log)"
            print(f"[tta] {i}/{len(jobs)} {variant} seed {seed}: {status} in {seconds:.0f}s", flush=True)
    runs = {(v, s): load_run(run_dir(args, v, s)) for v, s in jobs if finished(run_dir(args, v, s), args.steps)}
    missing = [f"{v}-s{s}" for v, s in jobs if (v, s) not in runs]
    if missing:
        print(f"[tta] not finished, left out of the tables: {', '.join(missing)}", flush=True)
    if not any(v == "grpo" for v, _ in runs):
        print("[tta] no finished GRPO run: nothing to compare against", file=sys.stderr)
        return 1
    result = analyze(args, runs)
    result["missing"] = missing
    with open(os.path.join(args.out, "tta.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = tables(result)
    with open(os.path.join(args.out, "tta.md"), "w") as f:
        f.write(text)
    plot(result, os.path.join(args.out, "tta.png"))
    print(text)
    print(f"[tta] wrote {args.out}/tta.json, tta.md, tta.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
