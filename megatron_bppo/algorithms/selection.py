"""Selection strategies: which completions of each group enter the update.

Every selector has one signature::

    select(correct[ng, G] bool, lengths[ng, G] int, advantages[ng, G], valid[ng, G] bool, **options)
        -> SelectionResult(mask[ng, G] bool, counts: dict[str, int])

``counts`` always holds: groups, groups_empty (no valid completion), groups_mixed, groups_all_correct,
groups_all_wrong (a group with one valid completion is single-class), selected, selected_correct,
selected_incorrect, groups_contributing (groups with >= 1 selected completion).

Registered: ``all`` (GRPO), ``binary`` (BPPO), ``random_pair`` (control: a random correct + a random incorrect
completion, seeded), ``max_variance_pairs`` (PODS-like down-sampling).
Add one with ``@register_selector("name")``; look one up with ``get_selector(name, **options)``.
Selection never changes advantages; ``weight_selected_advantages`` is the optional re-weighting.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch

SELECTORS: Dict[str, Callable[..., "SelectionResult"]] = {}
PAIR_WEIGHTINGS = ("none", "class_total", "contrast")
PAIR_SELECTORS = ("binary", "random_pair")       # one correct + one incorrect per mixed group, nothing otherwise


@dataclass
class SelectionResult:
    mask: torch.Tensor
    counts: Dict[str, int] = field(default_factory=dict)


def register_selector(name: str):
    """Decorator: register ``fn(correct, lengths, advantages, valid, **options)`` under ``name``."""
    def deco(fn):
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} is already registered")
        SELECTORS[name] = fn
        return fn
    return deco


def get_selector(name: str, **options) -> Callable[..., SelectionResult]:
    """Selector ``name`` with ``options`` bound; unknown names/options raise ValueError listing the valid ones."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selection strategy {name!r}; known: {sorted(SELECTORS)}")
    fn = SELECTORS[name]
    params = selector_options(name)
    bad = sorted(set(options) - set(params))
    if bad:
        raise ValueError(f"selector {name!r} has no option(s) {bad}; its options: {params}")
    return functools.partial(fn, **options) if options else fn


def selector_options(name: str) -> list[str]:
    """The option names selector `name` accepts (beyond correct, lengths, advantages, valid)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selection strategy {name!r}; known: {sorted(SELECTORS)}")
    return list(inspect.signature(SELECTORS[name]).parameters)[4:]


def _prepare(correct, lengths, advantages, valid):
    correct = torch.as_tensor(correct)
    if correct.dim() != 2:
        raise ValueError(f"correct must have shape [num_groups, G], got {tuple(correct.shape)}")
    shape = correct.shape
    for nm, t in (("lengths", lengths), ("advantages", advantages), ("valid", valid)):
        if t is not None and tuple(torch.as_tensor(t).shape) != tuple(shape):
            raise ValueError(f"{nm} must have shape {tuple(shape)} like correct, got {tuple(torch.as_tensor(t).shape)}")
    if valid is None:
        valid = torch.ones(shape, dtype=torch.bool, device=correct.device)
    valid = torch.as_tensor(valid).to(torch.bool)
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point():
        raise ValueError("lengths must be an integer tensor (response token counts)")
    if bool((lengths[valid] < 0).any()):
        raise ValueError("lengths must be >= 0")
    correct = correct.to(torch.bool) & valid
    return correct, lengths.to(torch.long), torch.as_tensor(advantages), valid


def _counts(correct, valid, mask) -> Dict[str, int]:
    n = valid.sum(1)
    k = correct.sum(1)
    mixed = (k > 0) & (k < n)
    return {
        "groups": int(correct.shape[0]),
        "groups_empty": int((n == 0).sum()),
        "groups_mixed": int(mixed.sum()),
        "groups_all_correct": int(((k == n) & (n > 0)).sum()),
        "groups_all_wrong": int(((k == 0) & (n > 0)).sum()),
        "selected": int(mask.sum()),
        "selected_correct": int((mask & correct).sum()),
        "selected_incorrect": int((mask & ~correct).sum()),
        "groups_contributing": int(mask.any(1).sum()) if mask.shape[1] else 0,
    }


@register_selector("all")
def select_all(correct, lengths, advantages, valid=None) -> SelectionResult:
    """GRPO: every valid completion. Uniform groups are kept (their advantages are 0) and counted."""
    correct, lengths, advantages, valid = _prepare(correct, lengths, advantages, valid)
    mask = valid.clone()
    return SelectionResult(mask, _counts(correct, valid, mask))


def _one_per_class(correct, valid, key) -> torch.Tensor:
    """Per mixed group (valid completions of both classes), the correct and the incorrect valid completion with the
    smallest `key`; nothing for single-class groups."""
    ng, G = correct.shape
    mask = torch.zeros((ng, G), dtype=torch.bool, device=correct.device)
    if not (ng and G):
        return mask
    n, k = valid.sum(1), correct.sum(1)
    mixed = (k > 0) & (k < n)
    rows = torch.arange(ng, device=correct.device)[mixed]
    top = torch.iinfo(key.dtype).max if not key.is_floating_point() else float("inf")
    for cls in (correct, valid & ~correct):
        mask[rows, torch.where(cls, key, torch.full_like(key, top)).argmin(dim=1)[mixed]] = True
    return mask


@register_selector("binary")
def select_binary(correct, lengths, advantages, valid=None) -> SelectionResult:
    """BPPO: per mixed group, the shortest correct and the shortest incorrect valid completion.

    i+ = argmin_{i valid, correct} (len_i, i);  i- = argmin_{i valid, wrong} (len_i, i).
    Ties in length go to the lowest index (deterministic; rollout order is random, so this is unbiased).
    Single-class groups select nothing (counted as groups_all_correct / groups_all_wrong).
    """
    correct, lengths, advantages, valid = _prepare(correct, lengths, advantages, valid)
    G = correct.shape[1]
    key = lengths * G + torch.arange(G, device=lengths.device)[None, :]      # (length, index), lexicographic
    mask = _one_per_class(correct, valid, key)
    return SelectionResult(mask, _counts(correct, valid, mask))


EARLY_STOP_POLICIES = ("off", "as_incorrect", "exclude")


def unselectable_running(finished: list[tuple[int, bool]], running: dict) -> list:
    """Running completions of one group that binary selection can never pick, whatever they end as.

    finished: (length, correct) of the group's finished completions; running: {key: tokens generated so far}.
    An unfinished completion of length L ends with at least L + 1 tokens; once L > max(shortest finished correct,
    shortest finished incorrect) it is strictly longer than both, so it can be neither class's shortest, and as
    a stopped completion of length L it is never picked either (ties go to the lower index, so > not >=)."""
    shortest_correct = min((n for n, c in finished if c), default=None)
    shortest_incorrect = min((n for n, c in finished if not c), default=None)
    if shortest_correct is None or shortest_incorrect is None:
        return []
    bound = max(shortest_correct, shortest_incorrect)
    return [key for key, length in running.items() if length > bound]


@register_selector("random_pair")
def select_random_pair(correct, lengths, advantages, valid=None, seed: int = 0) -> SelectionResult:
    """Control for BPPO: per mixed group, one uniformly random correct and one uniformly random incorrect valid
    completion (seeded: the same `seed` gives the same choice). Separates "fewer samples" from "the shortest ones".
    """
    correct, lengths, advantages, valid = _prepare(correct, lengths, advantages, valid)
    key = torch.rand(correct.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    mask = _one_per_class(correct, valid, key.to(correct.device))
    return SelectionResult(mask, _counts(correct, valid, mask))


@register_selector("max_variance_pairs")
def select_max_variance(correct, lengths, advantages, valid=None, m: int = 2,
                        skip_uniform: bool = True) -> SelectionResult:
    """PODS-like max-variance down-sampling (Xu et al. 2025): keep m completions per group maximising
    the variance of their rewards.

    Rewards enter through ``advantages`` (an increasing affine map of the reward within a group, so the
    argmax is the same). Order the valid completions by advantage descending (ties: shorter, then lower
    index) for the "top" list and ascending (same ties) for the "bottom" list; the optimum is the top j
    plus the bottom m-j for some j (PODS, Thm. 1): we take the first j in 0..m with the maximal variance.
    Groups with <= m valid completions keep all of them; uniform groups select nothing unless
    ``skip_uniform`` is False. For binary rewards and m = 2 this equals ``binary``.
    """
    if int(m) != m or m < 2:
        raise ValueError(f"max_variance_pairs option m must be an integer >= 2, got {m}")
    correct, lengths, advantages, valid = _prepare(correct, lengths, advantages, valid)
    ng, G = correct.shape
    mask = torch.zeros((ng, G), dtype=torch.bool)
    a = advantages.detach().to(torch.float64)
    for g in range(ng):
        idx = [i for i in range(G) if valid[g, i]]
        vals = {i: float(a[g, i]) for i in idx}
        if not idx or (skip_uniform and max(vals.values()) == min(vals.values())):
            continue
        if len(idx) <= m:
            mask[g, idx] = True
            continue
        top = sorted(idx, key=lambda i: (-vals[i], int(lengths[g, i]), i))
        bottom = sorted(idx, key=lambda i: (vals[i], int(lengths[g, i]), i))
        best, best_var = None, -1.0
        for j in range(m + 1):
            chosen = top[:j] + [i for i in bottom if i not in top[:j]][: m - j]
            x = torch.tensor([vals[i] for i in chosen], dtype=torch.float64)
            var = float(((x - x.mean()) ** 2).mean())
            if var > best_var + 1e-12:
                best, best_var = chosen, var
        mask[g, best] = True
    return SelectionResult(mask, _counts(correct, valid, mask))


def weight_selected_advantages(advantages, correct, mask, valid=None, pair_weighting: str = "none"):
    """Re-weighting of the selected completions' advantages (zero outside ``mask``); docs/algorithm.md section 3.

    none:        A'_i = A_i                                   (the paper-literal reading: full-group advantages)
    class_total: A'_i = A_i * n_c(i) / s_c(i)   where n_c = valid completions of i's class in the group and
                 s_c = selected ones of that class. For BPPO this gives k*A+ and (G-k)*A-, i.e. the pair
                 carries the same total weight per class as GRPO's whole group; the pair sums to zero.
    contrast:    A'_i = A_i - mean of the selected advantages of i's group: zero-sum per group. For a BPPO pair
                 +-(A+ - A-)/2 = +-1/(2 sigma): the pair's contrast A+ - A- without the common-mode term.
    For the ``all`` selector (GRPO) every weighting is the identity (up to float round-off for contrast).
    """
    if pair_weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"pair_weighting={pair_weighting!r} is not valid; choose one of {list(PAIR_WEIGHTINGS)}")
    correct, _, advantages, valid = _prepare(correct, torch.zeros(torch.as_tensor(correct).shape, dtype=torch.long),
                                             advantages, valid)
    mask = torch.as_tensor(mask).to(torch.bool) & valid
    out = torch.where(mask, advantages, torch.zeros_like(advantages))
    if pair_weighting == "none":
        return out
    if pair_weighting == "contrast":
        selected = mask.sum(1, keepdim=True).to(out.dtype)
        centre = out.sum(1, keepdim=True) / selected.clamp(min=1)
        return torch.where(mask, out - centre, torch.zeros_like(out))
    scale = torch.zeros_like(out)
    for cls in (correct, valid & ~correct):
        n_c = cls.sum(1, keepdim=True).to(out.dtype)
        s_c = (cls & mask).sum(1, keepdim=True).to(out.dtype)
        scale = torch.where(cls & mask, n_c / s_c.clamp(min=1), scale)
    return out * scale
