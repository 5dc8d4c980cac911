"""Prefix rule: how many response tokens of each selected completion enter the learner.

    ratio:  k = clamp(ceil(ratio * L), min_tokens, max_tokens)
    fixed:  k = clamp(tokens,          min_tokens, max_tokens)
    full:   k = L                                   (bounds ignored: BPPO-without-prefix ablation / GRPO)
    then always  k = min(k, L)  and  k = max(k, 1)   for L >= 1;   k = 0 for an empty response (L = 0).

So 1 <= k <= L for every non-empty response: the response length wins over ``min_tokens`` (a response shorter
than the floor is kept whole). ``schedule`` makes the mode's main value (``ratio`` or ``tokens``) a function
of the training step: a list of ``(step, value)`` points, linearly interpolated between points and held
constant before the first and after the last (two points = linear ramp; repeat a step for a jump).

The trainer (``batch.build_update_batch``) then builds each training sequence from the prompt and the first
k response tokens: the suffix is dropped from the token lists themselves (it is not masked: it costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

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
