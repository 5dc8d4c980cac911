"""Policy losses: clipped surrogate (asymmetric clip), KL to a reference, rollout IS.

Per token t of sequence i (m_it = loss mask, A_i or A_it = advantage):
    r_it   = exp(logp_it - old_logp_it)
    pg_it  = max(-A r_it, -A clip(r_it, 1 - clip_low, 1 + clip_high))            (PPO / DAPO clip-higher)
             implemented as: pg_it = -A r_it, except on CLIPPED tokens where it is the constant
             -A (1 +- clip) with zero gradient; clipped = (A > 0 and r > 1 + clip_high) or (A < 0 and r < 1 - clip_low)
             (strict: at exactly r = 1 +- clip the gradient still flows, the limit from inside the range).
    w_it   = min(exp(old_logp_it - rollout_logp_it), cap)   (rollout_is="truncated"; detached; 1 otherwise)
    l_it   = w_it pg_it + kl_coef kl(logp_it, ref_logp_it)
    loss   = aggregate(l, m, aggregation, normalizer, norm_constant)

Aggregation (``normalizer`` replaces the local denominator D; pass a GLOBAL one to make per-micro-batch
losses add up to the global loss):
    token-mean:            sum_it m l / D,   D = sum_it m                       (tokens)
    seq-mean-token-mean:   sum_i (sum_t m l / sum_t m) / D,  D = #sequences with >= 1 loss token
    token-sum-norm:        sum_it m l / (norm_constant * D),  D = #sequences with >= 1 loss token (Dr.GRPO)
With micro-batches b = 1..M on DP ranks d = 1..R: pass normalizer = the D of the whole global batch (summed
over all b and d); then sum_{b,d} loss_{b,d} is the global loss. Whatever the framework does afterwards (e.g.
Megatron dividing each micro-batch loss by M, DDP averaging gradients over R) must be undone by the caller
(multiply by M * R, or pass normalizer = D_global / (M * R)).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_IS_MODES = ("none", "truncated")


def _mode(field: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; choose one of {list(valid)}")


def _same_shape(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have shape {tuple(ref.shape)} like logprobs, got {tuple(t.shape)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: Optional[float] = None, norm_constant: Optional[float] = None) -> torch.Tensor:
    """Reduce per-token ``values[B, T]`` under ``mask[B, T]`` to a scalar (formulas in the module doc).

    A batch without loss tokens gives 0 (still connected to the graph). ``normalizer`` must be > 0.
    """
    _mode("aggregation", mode, AGGREGATIONS)
    if values.dim() != 2:
        raise ValueError(f"values must have shape [B, T], got {tuple(values.shape)}")
    _same_shape(values, mask=mask)
    if normalizer is not None and not float(normalizer) > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    m = mask.to(values.dtype)
    tok_per_seq = m.sum(dim=1)
    if mode == "token-mean":
        num, den = (values * m).sum(), m.sum()
    elif mode == "seq-mean-token-mean":
        num, den = ((values * m).sum(dim=1) / tok_per_seq.clamp(min=1)).sum(), (tok_per_seq > 0).sum()
    else:
        if norm_constant is None or not float(norm_constant) > 0:
            raise ValueError(f"aggregation='token-sum-norm' needs norm_constant > 0 (e.g. the max response "
                             f"length), got {norm_constant}")
        num, den = (values * m).sum() / float(norm_constant), (tok_per_seq > 0).sum()
    if normalizer is not None:
        return num / float(normalizer)
    return num / den.clamp(min=1).to(values.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators), d = ref - logp:
    k1 = -d = logp - ref;   k2 = d^2 / 2;   k3 = exp(d) - d - 1   (>= 0, unbiased, low variance)."""
    _mode("kl_estimator", estimator, KL_ESTIMATORS)
    _same_shape(logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                aggregation: str = "token-mean", norm_constant: Optional[float] = None,
                normalizer: Optional[float] = None, kl_coef: float = 0.0,
                ref_logprobs: Optional[torch.Tensor] = None, kl_estimator: str = "k3",
                rollout_logprobs: Optional[torch.Tensor] = None, rollout_is: str = "none",
                rollout_is_cap: float = 2.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (formula in the module doc) -> ``(loss, metrics)``.

    Shapes: logprobs, old_logprobs, mask, and the optional ref_logprobs / rollout_logprobs are [B, T];
    advantages is [B] (per sequence) or [B, T]. Gradients flow through ``logprobs`` only.
    Metrics are detached 0-dim tensors, token-means over THIS batch's mask (weight them by ``tokens``
    when averaging across micro-batches): pg_loss, clip_frac, clip_frac_low, clip_frac_high, approx_kl
    (k3 of old vs new), kl, ratio_mean, ratio_min, ratio_max, rollout_is_mean, rollout_is_clip_frac,
    tokens (the count of loss tokens).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {tuple(logprobs.shape)}")
    _same_shape(logprobs, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs,
                rollout_logprobs=rollout_logprobs)
    _mode("rollout_is", rollout_is, ROLLOUT_IS_MODES)
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages[:, None]
    elif tuple(advantages.shape) != tuple(logprobs.shape):
        raise ValueError(f"advantages must have shape [B] or [B, T] = {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    if not (clip_low >= 0 and clip_high >= 0 and clip_low < 1):
        raise ValueError(f"need clip_low in [0, 1) and clip_high >= 0, got {clip_low}, {clip_high}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if rollout_is != "none" and (rollout_logprobs is None or not rollout_is_cap > 0):
        raise ValueError(f"rollout_is={rollout_is!r} needs rollout_logprobs and rollout_is_cap > 0")

    adv = advantages.to(logprobs.dtype).detach()
    old = old_logprobs.detach()
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    clipped_high = (adv > 0) & (ratio > hi)
    clipped_low = (adv < 0) & (ratio < lo)
    bound = torch.where(clipped_high, torch.full_like(ratio, hi), torch.full_like(ratio, lo))
    pg = torch.where(clipped_high | clipped_low, -adv * bound, -adv * ratio)
    per_token = pg
    is_w = torch.ones_like(ratio)
    if rollout_is == "truncated":
        raw = torch.exp(old - rollout_logprobs.detach())
        is_w = raw.clamp(max=rollout_is_cap)
        per_token = per_token * is_w
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.detach(), kl_estimator)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, normalizer=normalizer, norm_constant=norm_constant)

    with torch.no_grad():
        m = mask.to(torch.bool)
        n = m.sum()

        def mean(x):
            return (x.to(torch.float64) * m).sum() / n.clamp(min=1)

        neg = -log_ratio.detach()
        metrics = {
            "pg_loss": mean(pg.detach()), "clip_frac": mean(clipped_high | clipped_low),
            "clip_frac_low": mean(clipped_low), "clip_frac_high": mean(clipped_high),
            "approx_kl": mean(torch.exp(neg) - neg - 1.0),
            "kl": mean(kl.detach()) if kl is not None else torch.zeros((), dtype=torch.float64),
            "ratio_mean": mean(ratio.detach()),
            "ratio_min": ratio.detach()[m].min() if bool(n) else torch.ones((), dtype=ratio.dtype),
            "ratio_max": ratio.detach()[m].max() if bool(n) else torch.ones((), dtype=ratio.dtype),
            "rollout_is_mean": mean(is_w),
            "rollout_is_clip_frac": mean(raw > rollout_is_cap) if rollout_is == "truncated"
            else torch.zeros((), dtype=torch.float64),
            "tokens": n,
        }
    return loss, metrics
