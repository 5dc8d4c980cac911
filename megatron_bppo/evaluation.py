"""Held-out evaluation through the rollout engine: pass@1 (greedy), mean@k (sampled), response lengths.

    held-out prompts --(engine.generate: greedy, 1 sample)--> pass@1 accuracy, mean / median length
                     --(engine.generate: sampling temperature, k samples)--> mean@k accuracy
    (each completion is scored on one rank and the verdicts shared: collect.score_once)
"""
from __future__ import annotations

import dataclasses
import statistics

from .collect import score_once


def _score(completions, prompts, reward_fn, reward_kwargs):
    """Correct flags (scored once over all ranks, shared: identical on every rank) and lengths, flat."""
    pairs = [(c.text, rendered.example.reference) for rendered, samples in zip(prompts, completions) for c in samples]
    correct = [ok for _, ok in score_once(reward_fn, pairs, reward_kwargs)]
    return correct, [len(c.token_ids) for samples in completions for c in samples]


def evaluate(engine, prompts: list, sampling, reward_fn, reward_kwargs: dict, samples: int, seed: int) -> dict:
    """`prompts`: rendered held-out prompts. Returns eval/* metrics (identical on every rank)."""
    ids = [list(r.token_ids) for r in prompts]
    greedy = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, seed=None)
    correct, lengths = _score(engine.generate(ids, 1, greedy), prompts, reward_fn, reward_kwargs)
    out = {"eval/accuracy": sum(correct) / max(len(correct), 1),
           "eval/response_length/mean": statistics.fmean(lengths) if lengths else 0.0,
           "eval/response_length/median": statistics.median(lengths) if lengths else 0.0,
           "eval/prompts": len(prompts)}
    if samples > 0:
        sampled = dataclasses.replace(sampling, seed=seed)
        correct_k, lengths_k = _score(engine.generate(ids, samples, sampled), prompts, reward_fn, reward_kwargs)
        out[f"eval/mean@{samples}"] = sum(correct_k) / max(len(correct_k), 1)
        out["eval/sampled_length/mean"] = statistics.fmean(lengths_k) if lengths_k else 0.0
    return out
