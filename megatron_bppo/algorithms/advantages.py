"""Rewards -> group statistics -> advantages, and what "correct" means.

Layout: dense ``[num_groups, G]`` tensors. Adaptive scheduling gives groups of different sizes, so every
function takes an optional ``valid`` bool mask of the same shape (True = a completion was actually sampled).
Statistics use valid entries only; invalid entries get advantage 0 and are never "correct". Values in invalid
slots are ignored entirely (they may be NaN padding).

Conventions (see docs/algorithm.md):
  * the std is the POPULATION std (``unbiased=False``) over the valid completions of the full group, so that for
    binary rewards with k of n correct, std = sqrt(p(1-p)) with p = k/n; ``unbiased=True`` selects the sample std
    (n-1 in the denominator, as TRL/verl do) and gives 0 for a one-sample group;
  * a uniform group (all valid rewards equal; includes n = 1) gets advantage exactly 0 in every mode;
  * a group with no valid entry gets advantage 0 (and is neither correct nor wrong);
  * NaN or infinite rewards in valid slots raise ValueError naming the first bad group.
"""
from __future__ import annotations

from typing import Optional

import torch

ADVANTAGE_MODES = ("grpo", "drgrpo")


def _check_mode(name: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def check_rewards(rewards: torch.Tensor, valid: Optional[torch.Tensor] = None):
    """Validate ``rewards[num_groups, G]`` (+ optional ``valid`` mask) and return ``(rewards_f, valid_bool)``.

    ``rewards_f`` is a floating tensor with invalid slots replaced by 0. Raises ValueError on a wrong rank,
    a mask of another shape, or a NaN / inf reward in a valid slot (naming the group index).
    """
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [num_groups, G], got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if valid is None:
        valid = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    else:
        if not isinstance(valid, torch.Tensor) or valid.shape != rewards.shape:
            shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"valid must be a bool tensor of shape {tuple(rewards.shape)}, got {shape}")
        valid = valid.to(torch.bool)
    bad = valid & ~torch.isfinite(rewards)
    if bool(bad.any()):
        g, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"reward of group {g}, completion {i} is {rewards[g, i].item()} (NaN/inf): "
            "fix the reward function or mark the completion invalid")
    return torch.where(valid, rewards, torch.zeros_like(rewards)), valid


def group_stats(rewards: torch.Tensor, valid: Optional[torch.Tensor] = None, unbiased: bool = False):
    """Per-group ``(mean, std, count)`` over the valid entries.

    mean_g = sum_i v_gi r_gi / n_g,   n_g = sum_i v_gi
    std_g  = sqrt(sum_i v_gi (r_gi - mean_g)^2 / (n_g - u)),   u = 1 if unbiased else 0
    Groups with n_g = 0 get mean 0, std 0; with ``unbiased`` a group with n_g = 1 gets std 0.
    """
    r, v = check_rewards(rewards, valid)
    vf = v.to(r.dtype)
    count = vf.sum(dim=1)
    mean = (r * vf).sum(dim=1) / count.clamp(min=1)
    sq = (((r - mean[:, None]) * vf) ** 2).sum(dim=1)
    denom = (count - 1) if unbiased else count
    std = torch.sqrt(sq / denom.clamp(min=1))
    std = torch.where(denom > 0, std, torch.zeros_like(std))
    return mean, std, count.to(torch.long)


def uniform_groups(rewards: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bool[num_groups]``: True where all valid rewards of the group are equal (includes 0 or 1 valid)."""
    r, v = check_rewards(rewards, valid)
    big = torch.finfo(r.dtype).max
    hi = torch.where(v, r, torch.full_like(r, -big)).amax(dim=1) if r.shape[1] else r.new_zeros(r.shape[0])
    lo = torch.where(v, r, torch.full_like(r, big)).amin(dim=1) if r.shape[1] else r.new_zeros(r.shape[0])
    return (hi <= lo) | (v.sum(dim=1) <= 1)


def group_advantages(rewards: torch.Tensor, mode: str = "grpo", eps: float = 1e-6,
                     valid: Optional[torch.Tensor] = None, unbiased: bool = False) -> torch.Tensor:
    """Full-group advantages, ``[num_groups, G]``, same dtype as the (floating) rewards.

    grpo:   A_gi = (r_gi - mean_g) / (std_g + eps)     (std: population unless ``unbiased``)
    drgrpo: A_gi =  r_gi - mean_g                      (Dr.GRPO, Liu et al. 2025: no std division)
    The statistics are over ALL valid completions of the group, also when a selector later keeps only a
    few of them (BPPO). Invalid entries and uniform groups (incl. G = 1) get exactly 0. Empty inputs
    (num_groups = 0 or G = 0) give an empty tensor of the same shape.
    """
    _check_mode("mode", mode, ADVANTAGE_MODES)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r, v = check_rewards(rewards, valid)
    mean, std, _ = group_stats(r, v, unbiased=unbiased)
    adv = r - mean[:, None]
    if mode == "grpo":
        adv = adv / (std[:, None] + eps)
    keep = v & ~uniform_groups(r, v)[:, None]
    return torch.where(keep, adv, torch.zeros_like(adv))
