"""Prefix rule: how many response tokens of each selected completion enter the learner.

    ratio:  k = clamp(ceil(ratio * L), min_tokens, max_tokens)
    fixed:  k = clamp(tokens,          min_tokens, max_tokens)
    full:   k = L                                   (bounds ignored: BPPO-without-prefix ablation / GRPO)
    then always  k = min(k, L)  and  k = max(k, 1)   for L >= 1;   k = 0 for an empty response (L = 0).

So 1 <= k <= L for every non-empty response: the response length wins over ``min_tokens`` (a response shorter
than the floor is kept whole). ``schedule`` makes the mode's main value (``ratio`` or ``tokens``) a function
of the training step: a list of ``(step, value)`` points, linearly interpolated between points and held
constant before the first and after the last (two points = linear ramp; repeat a step for a jump).

``cut_to_prefix`` then drops the suffix from the token lists themselves (it is not masked: it costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

PREFIX_MODES = ("ratio", "fixed", "full")


def _check_value(mode: str, value, field: str) -> None:
    if mode == "ratio" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"prefix {field} must be a number in (0, 1], got {value!r}")
    if mode == "fixed" and not (isinstance(value, (int, float)) and value >= 1):
        raise ValueError(f"prefix {field} must be a token count >= 1, got {value!r}")


def _schedule_value(schedule: Sequence[Tuple[int, float]], step: int) -> float:
    pts = list(schedule)
    if step <= pts[0][0]:
        return float(pts[0][1])
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if step < s1:
            return float(v0 + (v1 - v0) * (step - s0) / (s1 - s0)) if s1 > s0 else float(v1)
    return float(pts[-1][1])


@dataclass(frozen=True)
class PrefixRule:
    """Validated prefix configuration; ``rule.lengths(response_lengths, step)`` gives k per response.

    Defaults (docs/algorithm.md): ratio mode, ratio 0.5, floor 32 tokens, no ceiling.
    """
    mode: str = "ratio"
    ratio: float = 0.5
    tokens: Optional[int] = None
    min_tokens: int = 32
    max_tokens: Optional[int] = None
    schedule: Optional[Tuple[Tuple[int, float], ...]] = None

    def __post_init__(self):
        if self.mode not in PREFIX_MODES:
            raise ValueError(f"prefix mode={self.mode!r} is not valid; choose one of {list(PREFIX_MODES)}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"prefix min_tokens must be an integer >= 1, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or self.max_tokens < self.min_tokens:
                raise ValueError(f"prefix max_tokens must be an integer >= min_tokens ({self.min_tokens}), "
                                 f"got {self.max_tokens!r}")
        if self.schedule is not None:
            if self.mode == "full":
                raise ValueError("prefix schedule is meaningless with mode='full'; remove it or use ratio/fixed")
            pts = tuple((s, v) for s, v in self.schedule)
            if not pts:
                raise ValueError("prefix schedule must have at least one (step, value) point")
            steps = [s for s, _ in pts]
            if any(int(s) != s or s < 0 for s in steps) or steps != sorted(steps):
                raise ValueError(f"prefix schedule steps must be non-decreasing integers >= 0, got {steps}")
            for s, v in pts:
                _check_value(self.mode, v, f"schedule value at step {s}")
            object.__setattr__(self, "schedule", pts)
        elif self.mode == "ratio":
            _check_value("ratio", self.ratio, "ratio")
        elif self.mode == "fixed":
            if self.tokens is None:
                raise ValueError("prefix mode='fixed' needs tokens (or a schedule)")
            _check_value("fixed", self.tokens, "tokens")

    def value_at(self, step: Optional[int]) -> Optional[float]:
        """The ratio (ratio mode) or token count (fixed mode) in force at ``step``; None for full."""
        if self.mode == "full":
            return None
        if self.schedule is not None:
            if step is None:
                raise ValueError("this prefix rule has a schedule: pass the training step")
            return _schedule_value(self.schedule, int(step))
        return float(self.ratio if self.mode == "ratio" else self.tokens)

    def lengths(self, response_lengths, step: Optional[int] = None) -> torch.Tensor:
        """Prefix length k for each response length L (same shape, int64); formula in the module doc."""
        L = torch.as_tensor(response_lengths)
        if L.is_floating_point() or L.dtype == torch.bool:
            raise ValueError(f"response_lengths must be an integer tensor, got {L.dtype}")
        L = L.to(torch.long)
        if bool((L < 0).any()):
            raise ValueError("response_lengths must be >= 0")
        if self.mode == "full":
            return L.clone()
        value = self.value_at(step)
        if self.mode == "ratio":
            # float64 and a tiny slack so that e.g. 0.3 * 10 gives 3, not ceil(3.0000000000000004) = 4
            k = torch.ceil(L.to(torch.float64) * value - 1e-9).to(torch.long)
        else:
            k = torch.full_like(L, int(round(value)))
        k = k.clamp(min=self.min_tokens)
        if self.max_tokens is not None:
            k = k.clamp(max=self.max_tokens)
        k = torch.minimum(k, L).clamp(min=1)
        return torch.where(L > 0, k, torch.zeros_like(k))


def prefix_lengths(response_lengths, mode: str = "ratio", ratio: float = 0.5, tokens: Optional[int] = None,
                   min_tokens: int = 32, max_tokens: Optional[int] = None, step: Optional[int] = None,
                   schedule: Optional[Sequence[Tuple[int, float]]] = None) -> torch.Tensor:
    """Functional form of ``PrefixRule(mode, ratio, tokens, min_tokens, max_tokens, schedule).lengths(L, step)``."""
    rule = PrefixRule(mode=mode, ratio=ratio, tokens=tokens, min_tokens=min_tokens, max_tokens=max_tokens,
                      schedule=None if schedule is None else tuple(tuple(p) for p in schedule))
    return rule.lengths(response_lengths, step)


def cut_to_prefix(sequence_token_lists: Sequence, prompt_lengths: Sequence[int],
                  keep_lengths: Sequence[int]) -> List:
    """Truncate each ``prompt + response`` token list to ``prompt + first k response tokens``.

    out_i = seq_i[: prompt_len_i + k_i]   (lists or 1-D tensors; the same type comes back)
    The dropped suffix is gone from the learner's input (no padding, no masking). The cut sequence usually
    has no EOS: the learner must not append one, and every kept response token is a loss token.
    Raises ValueError when lengths disagree or k_i is not in [0, response_len_i].
    """
    seqs = list(sequence_token_lists)
    P = [int(p) for p in torch.as_tensor(prompt_lengths).reshape(-1).tolist()] if len(seqs) else []
    K = [int(k) for k in torch.as_tensor(keep_lengths).reshape(-1).tolist()] if len(seqs) else []
    if len(P) != len(seqs) or len(K) != len(seqs):
        raise ValueError(f"cut_to_prefix got {len(seqs)} sequences, {len(P)} prompt_lengths, "
                         f"{len(K)} keep_lengths; they must match")
    out = []
    for i, (seq, p, k) in enumerate(zip(seqs, P, K)):
        n = len(seq)
        if not 0 <= p <= n:
            raise ValueError(f"sequence {i}: prompt_length {p} outside [0, {n}] (sequence length)")
        if not 0 <= k <= n - p:
            raise ValueError(f"sequence {i}: keep_length {k} outside [0, {n - p}] (response length)")
        out.append(seq[: p + k])
    return out


def check_prefix_invariant(response_lengths, keep_lengths) -> None:
    """Raise ValueError unless 1 <= k <= L for L >= 1 and k = 0 for L = 0 (cheap guard for the trainer)."""
    L, k = torch.as_tensor(response_lengths), torch.as_tensor(keep_lengths)
    ok = torch.where(L > 0, (k >= 1) & (k <= L), k == 0)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0][0]) if ok.dim() else 0
        raise ValueError(f"prefix length violates 1 <= k <= L at index {i}")
