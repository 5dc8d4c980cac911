"""Reward functions by name: the contract, the registry and the batch helper.

A reward function takes one completion and its reference answer and returns a :class:`RewardResult`::

    @register_reward("my_reward")
    def my_reward(completion_text: str, reference: str, *, bonus: float = 0.0) -> RewardResult:
        ...

    fn = get_reward("my_reward")                      # or "my_package.module:function", imported on demand
    validate_reward_kwargs("my_reward", {"bonus": 0.1})   # at start-up: a typo is a clear error, not a crash later
    results = score_batch(fn, texts, references, bonus=0.1)

``score`` drives the advantages, ``correct`` drives BPPO's correct/incorrect selection and the accuracy metric.
A function may also return a bare float/bool; :func:`score_batch` wraps it (``correct = score > 0``).

This module knows no reward function itself: the built-ins ("math", "gsm8k") register themselves from
``megatron_bppo.rewards.math``, which the package ``megatron_bppo.rewards`` imports. Python runs that package's
``__init__`` before any of its submodules, so every importer of this module sees the built-ins registered.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "RewardFn",
    "RewardResult",
    "UnknownRewardError",
    "get_reward",
    "list_rewards",
    "register_reward",
    "reward_from_config",
    "score_batch",
    "validate_reward_kwargs",
]

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    score: float
    correct: bool
    extracted: Optional[str] = None
    details: dict = field(default_factory=dict)


RewardFn = Callable[..., RewardResult]

_REGISTRY: dict[str, RewardFn] = {}


class UnknownRewardError(ValueError):
    """The reward name is neither registered nor an importable ``module:function``."""


def register_reward(name: str, fn: Optional[RewardFn] = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name``; usable as ``@register_reward("name")`` or ``register_reward("name", fn)``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def _register(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r}: {f!r} is not callable")
        if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
            raise ValueError(f"reward {name!r} is already registered ({_REGISTRY[name].__module__}."
                             f"{_REGISTRY[name].__qualname__}); pass overwrite=True to replace it")
        _REGISTRY[name] = f
        return f

    return _register(fn) if fn is not None else _register


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The registered function ``name``, or ``package.module:function`` imported on demand."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UnknownRewardError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise UnknownRewardError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    names = list_rewards()
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownRewardError(
        f"unknown reward {name!r}. Registered rewards: {', '.join(names)}.{hint} Add one with "
        f"@megatron_bppo.rewards.register_reward('name') or give 'package.module:function'.")


def reward_from_config(reward_cfg) -> RewardFn:
    """config.RewardConfig (name, kwargs) -> its function, checked before anything is built: a ConfigError
    (``reward: ...``) for an unknown name or kwargs the function does not take. The trainer and `megatron-bppo
    eval` start with it."""
    from ..errors import ConfigError

    try:
        fn = get_reward(reward_cfg.name)
        validate_reward_kwargs(fn, reward_cfg.kwargs)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"reward: {e}") from None
    return fn


def validate_reward_kwargs(name_or_fn, kwargs: dict) -> None:
    """Raise ValueError naming the bad keys when ``kwargs`` do not fit the reward function's signature."""
    fn = get_reward(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in list(params.items())[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        label = name_or_fn if isinstance(name_or_fn, str) else getattr(fn, "__name__", repr(fn))
        raise ValueError(f"reward {label!r} does not take {', '.join(map(repr, bad))}; "
                         f"its options are: {', '.join(allowed) or '(none)'}")


def _coerce(out: Any) -> RewardResult:
    if isinstance(out, RewardResult):
        result = out
    elif isinstance(out, (bool, int, float)):
        result = RewardResult(score=float(out), correct=bool(out > 0))
    else:
        raise TypeError(f"reward function returned {type(out).__name__}; expected RewardResult or a number")
    score = float(result.score)
    if not math.isfinite(score):
        raise ValueError(f"reward function returned a non-finite score {result.score!r}")
    result.score = score
    result.correct = bool(result.correct)
    return result


def score_batch(fn: RewardFn, texts: Sequence[str], references: Sequence[str], *, on_error: str = "warn",
                **kwargs) -> list[RewardResult]:
    """``[fn(t, r, **kwargs) for t, r in zip(texts, references)]`` with checks.

    on_error: "warn" (default) turns an exception from ``fn`` into ``RewardResult(0.0, False,
    details={"error": ...})`` and logs the first one per batch, so one odd completion never kills a long run;
    "raise" re-raises. A non-finite score or a return value that is not a RewardResult/number counts as an error.
    """
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error={on_error!r}: choose 'warn' or 'raise'")
    if len(texts) != len(references):
        raise ValueError(f"score_batch: {len(texts)} texts but {len(references)} references")
    results, errors = [], 0
    for i, (text, ref) in enumerate(zip(texts, references)):
        try:
            results.append(_coerce(fn(text, ref, **kwargs)))
        except Exception as e:  # noqa: BLE001 - a reward bug on one sample must not end the run
            if on_error == "raise":
                raise
            if errors == 0:
                logger.warning("reward %s failed on sample %d (%s: %s); scored 0. Further failures in this batch "
                               "are counted in details['error'] only.", getattr(fn, "__name__", fn), i,
                               type(e).__name__, e)
            errors += 1
            results.append(RewardResult(0.0, False, None, {"error": f"{type(e).__name__}: {e}"}))
    return results
