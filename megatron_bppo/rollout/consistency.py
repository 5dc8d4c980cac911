"""Train/rollout log-prob mismatch: the engine's log-probs of its own sampled tokens vs the learner's.

    prompt + completion tokens --(Learner.compute_logprobs)--> per-token log-probs (len L-1)
      --(drop the prompt part: lp[prompt_len - 1:])--> learner log-probs of the completion tokens
    Completion.logprobs (engine) vs those --(logprob_mismatch)--> max / mean |diff| --(check_mismatch)--> warning

Both sides must describe the same distribution: the engine's `processed_logprobs` (after temperature) against a
learner run at the same temperature; top-p < 1 renormalises the engine's distribution over the nucleus, which
the learner does not do, so expect a gap there. Plain tensors in, numbers out; no torch.distributed.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def logprob_mismatch(engine: Sequence[torch.Tensor], learner: Sequence[torch.Tensor]) -> dict:
    """max and mean |engine - learner| over all tokens of all completions (empty completions are skipped)."""
    if len(engine) != len(learner):
        raise ValueError(f"{len(engine)} engine and {len(learner)} learner log-prob tensors")
    diffs = []
    for i, (e, l) in enumerate(zip(engine, learner)):
        if e.shape != l.shape:
            raise ValueError(f"completion {i}: engine log-probs {tuple(e.shape)} vs learner {tuple(l.shape)}")
        diffs.append((e.double() - l.double().to(e.device)).abs().flatten())
    flat = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if flat.numel() == 0:
        return {"logprob_abs_diff_max": 0.0, "logprob_abs_diff_mean": 0.0, "tokens": 0}
    return {"logprob_abs_diff_max": float(flat.max()), "logprob_abs_diff_mean": float(flat.mean()),
            "tokens": int(flat.numel())}


def check_mismatch(stats: dict, threshold: float, step: Optional[int] = None) -> bool:
    """Warn (logging.warning) when the mean |diff| exceeds `threshold` (rollout.logprob_mismatch_warn)."""
    if stats["logprob_abs_diff_mean"] > threshold:
        at = f" at step {step}" if step is not None else ""
        logger.warning("train/rollout log-prob mismatch%s: mean |diff| %.3g > rollout.logprob_mismatch_warn=%g "
                       "(max %.3g over %d tokens): the engine does not sample from the learner's policy -- "
                       "check the weight sync, dtypes and the sampling temperature", at,
                       stats["logprob_abs_diff_mean"], threshold, stats["logprob_abs_diff_max"], stats["tokens"])
        return False
    return True
