"""Answer equivalence (fast exact/numeric paths, then math-verify) and the built-in ``math`` and ``gsm8k`` rewards.

:func:`answers_match` decides in this order, and reports which rule decided (``Match.method``):

1. ``no_answer``   nothing was extracted -> not equal;
2. ``exact``       equal strings after trimming ``$``, spaces and a final period;
3. ``numeric``     both sides are plain numbers (``1,234``, ``$5``, ``5.0``, ``3/4``, ``\\frac{3}{4}``, ``50%``):
                   exact rational comparison, with a relative tolerance of 1e-6 for rounded decimals;
                   the result is final (math-verify is not asked);
4. ``math_verify`` ``math_verify.parse`` of both (wrapped in ``$...$``) and ``math_verify.verify(gold, pred)``:
                   ``x^2+2x+1`` vs ``(x+1)^2``, ``\\sqrt{2}/2`` vs ``\\frac{\\sqrt2}{2}``, intervals, tuples;
5. ``string``      math-verify missing, failing, or the answers longer than ``MAX_VERIFY_CHARS``: equality of
                   whitespace/``\\left``/``\\dfrac``-normalised strings.

Time safety: math-verify's own timeouts use ``SIGALRM`` and work only in the main thread. There we pass
``timeout_s`` (whole seconds); in any other thread we pass no timeout (a signal handler cannot be set there,
and math-verify would swallow that error and answer "not equal" for everything) and rely on the length cap.
A pair that hits the timeout counts as not equal; one call can take up to about 5 x ``timeout_s`` in the worst case
(parse of each side, verify of two candidate forms). Results are memoised (``lru_cache``), since G samples of one
prompt often give the same answer. The alarm is math-verify's: do not use SIGALRM elsewhere in the trainer.
"""
from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import NamedTuple, Optional

from megatron_bppo.rewards.extract import extract_answer, extract_boxed, extract_hash, strip_answer, to_fraction
from megatron_bppo.rewards.registry import RewardResult, register_reward

__all__ = ["MAX_VERIFY_CHARS", "Match", "answers_match", "gsm8k_reward", "math_reward", "reference_answer"]

logger = logging.getLogger(__name__)

MAX_VERIFY_CHARS = 400
_REL_TOL = 1e-6
_warned_missing = False


class Match(NamedTuple):
    equal: bool
    method: str  # no_answer | exact | numeric | math_verify | string


def reference_answer(reference: str) -> str:
    """The answer inside a reference: after ``####`` (raw GSM8K answer), the last ``\\boxed{}`` (raw MATH
    solution), else the trimmed string itself."""
    ref = str(reference)
    if "####" in ref:
        ans = extract_hash(ref, numeric=False)
        if ans is not None:
            return ans
    if "\\boxed" in ref or "\\fbox" in ref:
        ans = extract_boxed(ref)
        if ans is not None:
            return ans
    return strip_answer(ref)


def _norm_str(s: str) -> str:
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    return re.sub(r"\s+", "", s)


def _math_verify():
    global _warned_missing
    try:
        import math_verify
        return math_verify
    except ImportError:
        if not _warned_missing:
            logger.warning("math-verify is not installed: symbolic answers are compared as strings "
                           "(pip install math-verify)")
            _warned_missing = True
        return None


@lru_cache(maxsize=65536)
def _verify(pred: str, ref: str, timeout: Optional[int]) -> Optional[bool]:
    """math-verify's verdict, or None when it is unavailable or could not parse one side."""
    mv = _math_verify()
    if mv is None:
        return None
    try:
        gold = mv.parse(f"${ref}$", parsing_timeout=timeout) or mv.parse(ref, parsing_timeout=timeout)
        if not gold:
            return None
        for candidate in (f"${pred}$", pred):
            target = mv.parse(candidate, parsing_timeout=timeout)
            if target and mv.verify(gold, target, timeout_seconds=timeout):
                return True
        return False
    except Exception as e:  # noqa: BLE001 - sympy can fail in many ways; fall back to strings
        logger.debug("math-verify failed on %r vs %r: %s", pred, ref, e)
        return None


def answers_match(pred: Optional[str], reference: str, *, use_math_verify: bool = True, timeout_s: int = 3) -> Match:
    """Whether the extracted answer ``pred`` equals ``reference`` (an answer string, not a whole solution)."""
    if pred is None:
        return Match(False, "no_answer")
    p, r = strip_answer(str(pred)), strip_answer(str(reference))
    if not p:
        return Match(False, "no_answer")
    if p == r:
        return Match(True, "exact")
    fp, fr = to_fraction(p), to_fraction(r)
    if fp is not None and fr is not None:
        equal = fp == fr or abs(fp - fr) <= _REL_TOL * max(1, abs(fr))
        return Match(bool(equal), "numeric")
    if use_math_verify and len(p) <= MAX_VERIFY_CHARS and len(r) <= MAX_VERIFY_CHARS:
        in_main = threading.current_thread() is threading.main_thread()
        timeout = max(1, int(timeout_s)) if (in_main and timeout_s) else None
        verdict = _verify(p, r, timeout)
        if verdict is not None:
            return Match(verdict, "math_verify")
    return Match(_norm_str(p) == _norm_str(r), "string")


def _graded(completion_text: str, reference: str, *, order, hash_numeric: bool, correct_score: float,
            incorrect_score: float, format_bonus: float, use_math_verify: bool, timeout_s: int) -> RewardResult:
    ref = reference_answer(reference)
    ex = extract_answer(completion_text or "", order=order, hash_numeric=hash_numeric)
    match = answers_match(ex.answer, ref, use_math_verify=use_math_verify, timeout_s=timeout_s)
    formatted = ex.source in ("hash", "boxed")
    score = (correct_score if match.equal else incorrect_score) + (format_bonus if formatted else 0.0)
    return RewardResult(score=float(score), correct=match.equal, extracted=ex.answer,
                        details={"source": ex.source, "method": match.method, "formatted": formatted,
                                 "reference": ref})


@register_reward("math")
def math_reward(completion_text: str, reference: str, *, correct_score: float = 1.0, incorrect_score: float = 0.0,
                format_bonus: float = 0.0, allow_last_number: bool = True, use_math_verify: bool = True,
                timeout_s: int = 3) -> RewardResult:
    """MATH-style: the last ``\\boxed{}``, else the line after ``####``, else (allow_last_number) the last number;
    graded ``correct_score`` / ``incorrect_score``, plus ``format_bonus`` when the answer was boxed or after
    ``####``."""
    order = ("boxed", "hash", "last_number") if allow_last_number else ("boxed", "hash")
    return _graded(completion_text, reference, order=order, hash_numeric=False, correct_score=correct_score,
                   incorrect_score=incorrect_score, format_bonus=format_bonus, use_math_verify=use_math_verify,
                   timeout_s=timeout_s)


@register_reward("gsm8k")
def gsm8k_reward(completion_text: str, reference: str, *, correct_score: float = 1.0, incorrect_score: float = 0.0,
                 format_bonus: float = 0.0, allow_last_number: bool = True, use_math_verify: bool = True,
                 timeout_s: int = 3) -> RewardResult:
    """GSM8K-style (and the generated arithmetic task): the first number after ``####``, else the last
    ``\\boxed{}``, else (allow_last_number) the last number in the text; same grading as ``math``."""
    order = ("hash", "boxed", "last_number") if allow_last_number else ("hash", "boxed")
    return _graded(completion_text, reference, order=order, hash_numeric=True, correct_score=correct_score,
                   incorrect_score=incorrect_score, format_bonus=format_bonus, use_math_verify=use_math_verify,
                   timeout_s=timeout_s)
