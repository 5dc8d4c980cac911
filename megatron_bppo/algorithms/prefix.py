"""Prefix rule: how many response tokens of each selected completion enter the learner.

    ratio:      k = clamp(ceil(ratio * L), min_tokens, max_tokens)
    fixed:      k = clamp(tokens,          min_tokens, max_tokens)
    full:       k = L                                   (bounds ignored: BPPO-without-prefix ablation / GRPO)
    pair:       k = clamp(min(L+, L-),     min_tokens, max_tokens)   both members cut to the pair's shorter
                                                        length: the shorter one whole, the longer one as long
    to_correct: k = clamp(L+,              min_tokens, max_tokens)   both members cut to the correct member's
                                                        length: the correct one whole (its answer and EOS)
    then always  k = min(k, L)  and  k = max(k, 1)   for L >= 1;   k = 0 for an empty response (L = 0).

The pair modes (PAIR_PREFIX_MODES) need each group's selected completions:
``rule.group_lengths(lengths, correct, mask)`` (the batch builder's one call) computes the reference length per
group, L+ / L- being the shortest selected correct / incorrect response of the group (a pair selector selects one
of each); the per-response modes ignore the group. A group whose selection lacks the class a mode refers to
(to_correct without a selected correct completion; cannot happen with the pair selectors, which select both
classes or nothing) cuts its responses at max_tokens only. "Whole" always means: up to max_tokens, when set.

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

PREFIX_MODES = ("ratio", "fixed", "full", "pair", "to_correct")
PAIR_PREFIX_MODES = ("pair", "to_correct")    # need the group's selected pair (config: a pair selector)


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
            if self.mode in ("full", *PAIR_PREFIX_MODES):
                raise ValueError(f"prefix schedule is meaningless with mode={self.mode!r}; remove it or use "
                                 "ratio/fixed")
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
        """The ratio (ratio mode) or token count (fixed mode) in force at ``step``; None for full and the pair
        modes."""
        if self.mode in ("full", *PAIR_PREFIX_MODES):
            return None
        if self.schedule is not None:
            if step is None:
                raise ValueError("this prefix rule has a schedule: pass the training step")
            return _schedule_value(self.schedule, int(step))
        return float(self.ratio if self.mode == "ratio" else self.tokens)

    def lengths(self, response_lengths, step: Optional[int] = None, reference=None) -> torch.Tensor:
        """Prefix length k for each response length L (same shape, int64); formula in the module doc. The pair
        modes take each response's ``reference`` length (its group's min(L+, L-) or L+: ``group_lengths``)."""
        L = _lengths_tensor(response_lengths, "response_lengths")
        if self.mode == "full":
            return L.clone()
        if self.mode in PAIR_PREFIX_MODES:
            if reference is None:
                raise ValueError(f"prefix mode={self.mode!r} cuts to a length taken from the selected pair: pass "
                                 "reference (PrefixRule.group_lengths computes it)")
            k = _lengths_tensor(reference, "reference").expand_as(L).clone()
        else:
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

    def group_lengths(self, lengths, correct, mask, step: Optional[int] = None) -> torch.Tensor:
        """k[num_groups, G] for the selected completions (``mask``), 0 elsewhere: the batch builder's one call.
        lengths: full response lengths; correct: the reward's verdicts; the pair modes read each group's selected
        completions (module doc), the others cut every response on its own."""
        L = _lengths_tensor(lengths, "lengths")
        correct, mask = torch.as_tensor(correct).to(torch.bool), torch.as_tensor(mask).to(torch.bool)
        if L.dim() != 2 or correct.shape != L.shape or mask.shape != L.shape:
            raise ValueError(f"lengths, correct and mask must have one shape [num_groups, G], got {tuple(L.shape)}, "
                             f"{tuple(correct.shape)}, {tuple(mask.shape)}")
        if not L.numel():
            return torch.zeros_like(L)
        reference = None
        if self.mode in PAIR_PREFIX_MODES:
            members = mask & correct if self.mode == "to_correct" else mask
            big = torch.full_like(L, torch.iinfo(torch.long).max)
            shortest = torch.where(members, L, big).min(dim=1, keepdim=True).values       # L+ or min(L+, L-)
            reference = torch.where(shortest == big, L, shortest.expand_as(L))          # no such member: whole
        k = self.lengths(L, step, reference)
        return torch.where(mask, k, torch.zeros_like(k))


def _lengths_tensor(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    t = t.to(torch.long)
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    return t
