"""Held-out evaluation through the rollout engine, per problem: the trainer's in-run checks, `megatron-bppo eval`
and the benchmarks' final evaluations are this one implementation.

    prompts --(engine.generate: greedy, 1 sample)--> greedy response per problem
            --(engine.generate: sampling temperature and seed, k samples)--> k responses per problem
            (each response scored on one rank and the verdicts shared: collect.score_once)
        --> per-problem records (evaluate_problems) --(summarize)--> pass@1, mean@k, pass@j, lengths, truncation
    two evaluations of the same problems and settings --(paired_compare: paired bootstrap over problems)-->
        the difference of pass@1 / mean@k / length with a 95 % interval, problems each one alone gets right
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from typing import Callable, Optional

from .collect import score_once


def score_completions(completions, prompts, reward_fn, reward_kwargs) -> list[list[dict]]:
    """engine completions per prompt -> [{response, correct, length, finish}] per prompt (verdicts scored once over
    all ranks, shared: identical on every rank)."""
    pairs = [(c.text, rendered.example.reference) for rendered, samples in zip(prompts, completions) for c in samples]
    verdicts = iter(ok for _, ok in score_once(reward_fn, pairs, reward_kwargs))
    return [[{"response": c.text, "correct": bool(next(verdicts)), "length": len(c.token_ids),
              "finish": c.finish_reason} for c in samples] for samples in completions]


def evaluate_problems(engine, prompts: list, sampling, reward_fn, reward_kwargs: dict, samples: int,
                      seed: Optional[int], progress: Optional[Callable[[str, int, float], None]] = None
                      ) -> list[dict]:
    """`prompts`: rendered prompts. One record per prompt: index, id, prompt text, reference, `greedy` (one
    response at temperature 0) and, with samples > 0, `samples` (k responses at sampling.temperature / top_p with
    sampling seed `seed`). `progress(phase, generated tokens, seconds)` is called after each phase ("greedy",
    "<k> samples"); its seconds cover generation and scoring."""
    ids = [list(r.token_ids) for r in prompts]

    def phase(name, n, phase_sampling):
        started = time.perf_counter()
        scored = score_completions(engine.generate(ids, n, phase_sampling), prompts, reward_fn, reward_kwargs)
        if progress:
            progress(name, sum(r["length"] for s in scored for r in s), time.perf_counter() - started)
        return scored

    greedy = phase("greedy", 1, dataclasses.replace(sampling, temperature=0.0, top_p=1.0, seed=None))
    sampled = [[] for _ in prompts]
    if samples > 0:
        sampled = phase(f"{samples} samples", samples, dataclasses.replace(sampling, seed=seed))
    return [{"index": i, "id": str(r.example.id), "prompt": r.text, "reference": str(r.example.reference),
             "greedy": g[0], "samples": s} for i, (r, g, s) in enumerate(zip(prompts, greedy, sampled))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples: powers of two up to n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n else []


def _lengths(responses: list[dict]) -> dict:
    lengths = [r["length"] for r in responses]
    return {"mean": statistics.fmean(lengths) if lengths else 0.0,
            "median": statistics.median(lengths) if lengths else 0.0,
            "truncated": sum(r["finish"] == "length" for r in responses) / max(len(responses), 1)}


def summarize(problems: list[dict]) -> dict:
    """The figures of evaluate_problems' records: greedy pass@1, greedy lengths and truncation rate; with samples,
    mean@k (mean correct share), pass@j for j in pass_ks(k), sampled lengths and truncation."""
    greedy = [p["greedy"] for p in problems]
    out = {"problems": len(problems),
           "pass@1": sum(r["correct"] for r in greedy) / max(len(greedy), 1),
           "greedy_length": _lengths(greedy)}
    k = len(problems[0]["samples"]) if problems else 0
    if k:
        correct = [sum(r["correct"] for r in p["samples"]) for p in problems]
        out.update({"k": k, f"mean@{k}": sum(correct) / (k * len(problems)),
                    "sampled_length": _lengths([r for p in problems for r in p["samples"]])})
        for j in pass_ks(k):
            out[f"pass@{j}_sampled"] = statistics.fmean(pass_at_k(k, c, j) for c in correct)
    return out


def evaluate(engine, prompts: list, sampling, reward_fn, reward_kwargs: dict, samples: int, seed: int) -> dict:
    """The trainer's in-run evaluation: eval/* metrics of evaluate_problems (identical on every rank)."""
    s = summarize(evaluate_problems(engine, prompts, sampling, reward_fn, reward_kwargs, samples, seed))
    out = {"eval/accuracy": s["pass@1"], "eval/response_length/mean": s["greedy_length"]["mean"],
           "eval/response_length/median": s["greedy_length"]["median"], "eval/prompts": len(prompts)}
    if samples > 0:
        out[f"eval/mean@{samples}"] = s[f"mean@{samples}"]
        out["eval/sampled_length/mean"] = s["sampled_length"]["mean"]
    return out


# ------------------------------------------------------------------------------------------ paired comparison
def per_problem_figures(problem: dict) -> dict:
    """The per-problem quantities paired_compare differences: greedy correct (0/1), greedy length and, with
    samples, the correct share of the k samples."""
    out = {"pass@1": float(problem["greedy"]["correct"]), "greedy_length": float(problem["greedy"]["length"])}
    if problem["samples"]:
        out["mean@k"] = sum(r["correct"] for r in problem["samples"]) / len(problem["samples"])
    return out


def paired_compare(a: list[dict], b: list[dict], resamples: int = 10000, seed: int = 0) -> dict:
    """A - B over the problems both evaluated (matched by id, in A's order): per figure the mean difference and a
    95 % percentile interval of a paired bootstrap over problems (`resamples` draws, seeded); for pass@1 the
    number of problems only A gets right and only B gets right. Raises ValueError when no problem is shared."""
    by_id = {p["id"]: p for p in b}
    pairs = [(per_problem_figures(p), per_problem_figures(by_id[p["id"]])) for p in a if p["id"] in by_id]
    if not pairs:
        raise ValueError("the two evaluations share no problem id")
    names = [n for n in pairs[0][0] if all(n in x and n in y for x, y in pairs)]
    diffs = {n: [x[n] - y[n] for x, y in pairs] for n in names}
    rng = random.Random(seed)
    n = len(pairs)
    draws = {name: [] for name in names}
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        for name in names:
            d = diffs[name]
            draws[name].append(sum(d[i] for i in idx) / n)
    out = {"problems": n, "resamples": resamples, "seed": seed, "figures": {}}
    for name in names:
        ordered = sorted(draws[name])
        out["figures"][name] = {"a": statistics.fmean(x[name] for x, _ in pairs),
                                "b": statistics.fmean(y[name] for _, y in pairs),
                                "diff": statistics.fmean(diffs[name]),
                                "ci95": [percentile(ordered, 0.025), percentile(ordered, 0.975)]}
    out["only_a_correct"] = sum(x["pass@1"] > y["pass@1"] for x, y in pairs)
    out["only_b_correct"] = sum(y["pass@1"] > x["pass@1"] for x, y in pairs)
    return out


def percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile q of an ascending list."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
