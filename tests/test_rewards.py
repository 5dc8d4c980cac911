"""Answer extraction, equivalence (fast paths and math-verify) and the reward registry."""
import threading

import pytest

from megatron_bppo.rewards import (RewardResult, UnknownRewardError, answers_match, extract_answer, extract_boxed,
                                   extract_hash, extract_last_number, get_reward, list_rewards, normalize_number,
                                   reference_answer, register_reward, score_batch,
                                   validate_reward_kwargs)
from megatron_bppo.rewards import registry as registry_mod


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234 apples", "1,234"),
    ("#### The answer is $5.00.", "5.00"),
    ("#### -12", "-12"),
    ("####\n 42", "42"),
    ("first #### 5 then #### 6", "5"),          # the first marker wins
    ("#### no number here\n#### 9", "9"),        # ... the first one followed by a number
    ("##### 8", "8"),
    ("no marker 5", None),
    ("####", None),
])
def test_extract_hash_numeric(text, expected):
    assert extract_hash(text) == expected


def test_extract_hash_text_mode():
    assert extract_hash("#### \\frac{1}{2}.", numeric=False) == "\\frac{1}{2}"
    assert extract_hash("#### $x^2$\nmore", numeric=False) == "x^2"


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{5}", "5"),
    ("a \\boxed{1} then \\boxed{2}", "2"),                                  # the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                              # nested braces
    ("$\\boxed{x^{2}+\\sqrt{y_{1}}}$.", "x^{2}+\\sqrt{y_{1}}"),
    ("\\boxed 7 is it", "7"),
    ("\\fbox{3}", "3"),
    ("good \\boxed{4} then broken \\boxed{5", "4"),                         # unbalanced last -> the earlier one
    ("\\boxed{}", None),
    ("nothing", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("9 + 8 = 17.", "17"),
    ("costs $1,234.50 total", "1,234.50"),
    ("x is -3", "-3"),
    ("3-5", "5"),
    ("half is 1/2", "1/2"),
    ("version 2 of x2", "2"),
    ("no digits", None),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_order_and_source():
    text = "I think \\boxed{3}. Final: #### 4 and then 5"
    assert extract_answer(text, order=("hash", "boxed", "last_number")) == ("4", "hash")
    assert extract_answer(text, order=("boxed", "hash")).answer == "3"
    assert extract_answer("just 12 and 13", order=("hash", "boxed", "last_number")) == ("13", "last_number")
    assert extract_answer("nothing", order=("hash", "boxed")) == (None, None)
    with pytest.raises(ValueError, match="unknown answer source"):
        extract_answer("x", order=("bogus",))


@pytest.mark.parametrize("raw, expected", [
    ("1,234", "1234"), ("$5", "5"), ("\\$5", "5"), ("5.0", "5"), ("5.", "5"), ("12.50", "12.5"), ("0.5", "0.5"),
    ("1/2", "0.5"), ("2/4", "0.5"), ("1/3", "1/3"), ("\\frac{3}{4}", "0.75"), ("\\dfrac12", "0.5"),
    ("-\\frac{1}{3}", "-1/3"), ("50%", "50"), ("50\\%", "50"), ("1{,}000", "1000"), ("-0", "0"),
    ("x", None), ("1/0", None), ("", None), (None, None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("pred, ref, equal, method", [
    ("7", "7", True, "exact"),
    ("1,234", "1234", True, "numeric"),
    ("5.0", "5", True, "numeric"),
    ("$5", "5", True, "numeric"),
    ("0.5", "1/2", True, "numeric"),
    ("\\frac{1}{2}", "0.5", True, "numeric"),
    ("0.333333", "1/3", True, "numeric"),    # within the 1e-6 relative tolerance
    ("0.33", "1/3", False, "numeric"),
    ("8", "7", False, "numeric"),
    ("x^2+2x+1", "(x+1)^2", True, "math_verify"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True, "math_verify"),
    ("(1,2)", "\\left(1, 2\\right)", True, "math_verify"),
    ("x^2+1", "(x+1)^2", False, "math_verify"),
    (None, "3", False, "no_answer"),
])
def test_answers_match(pred, ref, equal, method):
    assert answers_match(pred, ref) == (equal, method)


def test_answers_match_without_math_verify_uses_strings():
    assert answers_match("\\dfrac{a}{b}", "\\frac{a}{ b}", use_math_verify=False) == (True, "string")
    assert answers_match("x^2+2x+1", "(x+1)^2", use_math_verify=False) == (False, "string")


def test_answers_match_in_worker_thread():
    """math-verify's SIGALRM timeouts cannot be set outside the main thread; we must still get a real verdict."""
    out = []
    t = threading.Thread(target=lambda: out.append(answers_match("2x+2x", "4x", timeout_s=5)))
    t.start()
    t.join()
    assert out == [(True, "math_verify")]


def test_answers_match_time_and_size_guards():
    import time

    from megatron_bppo.rewards.math import MAX_VERIFY_CHARS

    start = time.perf_counter()
    assert answers_match("9^{9^{9^{9}}}", "3", timeout_s=1) == (False, "math_verify")   # sympy would run for ages
    assert time.perf_counter() - start < 10
    huge = "x+" * MAX_VERIFY_CHARS + "x"
    assert answers_match(huge, huge + " ") == (True, "exact")
    assert answers_match(huge, "y") == (False, "string")                                 # never sent to sympy


def test_reference_answer():
    assert reference_answer("He has 5+3=8 apples.\n#### 8") == "8"
    assert reference_answer("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer(" $42$ ") == "42"


def test_gsm8k_reward_values():
    fn = get_reward("gsm8k")
    r = fn("3 + 4 = 7\n#### 7", "7")
    assert (r.score, r.correct, r.extracted, r.details["source"]) == (1.0, True, "7", "hash")
    r = fn("The answer is 7 apples.", "#### 7")          # last-number fallback, raw GSM8K reference
    assert (r.score, r.correct, r.details["source"], r.details["formatted"]) == (1.0, True, "last_number", False)
    r = fn("#### 8", "7")
    assert (r.score, r.correct) == (0.0, False)
    r = fn("it is 7", "7", allow_last_number=False)
    assert (r.score, r.correct, r.extracted) == (0.0, False, None)
    r = fn("#### 1,234", "1234", format_bonus=0.1)
    assert (r.score, r.correct) == (1.1, True)
    r = fn("#### 5", "7", format_bonus=0.1, incorrect_score=-1.0)
    assert (r.score, r.correct) == (pytest.approx(-0.9), False)
    assert fn("", "7") == RewardResult(0.0, False, None, {"source": None, "method": "no_answer", "formatted": False,
                                                          "reference": "7"})


def test_math_reward_values():
    fn = get_reward("math")
    r = fn("so \\boxed{\\frac{1}{2}}", "0.5")
    assert (r.score, r.correct, r.extracted) == (1.0, True, "\\frac{1}{2}")
    r = fn("We get $\\boxed{x^2+2x+1}$.", "The solution: $\\boxed{(x+1)^2}$")   # a raw MATH solution works too
    assert (r.correct, r.details["method"]) == (True, "math_verify")
    r = fn("\\boxed{3} and later #### 4", "4")                                   # boxed first for math
    assert (r.correct, r.extracted) == (False, "3")
    r = fn("#### The answer is $5.00.", "5")                                     # text after #### via math-verify
    assert r.correct


def test_registry_and_errors():
    assert {"gsm8k", "math"} <= set(list_rewards())
    with pytest.raises(UnknownRewardError, match=r"Registered rewards: .*gsm8k.*math.*Did you mean 'math'"):
        get_reward("mathh")
    with pytest.raises(UnknownRewardError, match="cannot import module"):
        get_reward("no_such_pkg_xyz.mod:fn")
    assert get_reward("megatron_bppo.rewards.math:gsm8k_reward") is get_reward("gsm8k")

    @register_reward("test_len_penalty")
    def length_penalty(completion_text, reference, *, scale=1.0):
        return RewardResult(-scale * len(completion_text), False)

    try:
        assert get_reward("test_len_penalty") is length_penalty
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_len_penalty", lambda t, r: 0.0)
        register_reward("test_len_penalty", length_penalty)      # same function again: fine
        validate_reward_kwargs("test_len_penalty", {"scale": 2})
        with pytest.raises(ValueError, match=r"does not take 'scal'; its options are: scale"):
            validate_reward_kwargs("test_len_penalty", {"scal": 2})
        with pytest.raises(ValueError, match="does not take 'bonus'"):
            validate_reward_kwargs("gsm8k", {"bonus": 1})
        validate_reward_kwargs("gsm8k", {"format_bonus": 0.1, "timeout_s": 2})
    finally:
        registry_mod._REGISTRY.pop("test_len_penalty", None)


def test_score_batch():
    fn = get_reward("gsm8k")
    out = score_batch(fn, ["#### 3", "4", "no"], ["3", "5", "1"], format_bonus=0.5)
    assert [(r.score, r.correct) for r in out] == [(1.5, True), (0.0, False), (0.0, False)]
    with pytest.raises(ValueError, match="2 texts but 1 references"):
        score_batch(fn, ["a", "b"], ["1"])

    def flaky(text, ref):
        if text == "boom":
            raise RuntimeError("bad sample")
        return 1.0 if text == ref else 0.0     # bare numbers are wrapped

    out = score_batch(flaky, ["1", "boom", "2"], ["1", "1", "1"])
    assert [(r.score, r.correct) for r in out] == [(1.0, True), (0.0, False), (0.0, False)]
    assert out[1].details == {"error": "RuntimeError: bad sample"}
    with pytest.raises(RuntimeError):
        score_batch(flaky, ["boom"], ["1"], on_error="raise")
    out = score_batch(lambda t, r: float("nan"), ["x"], ["1"])
    assert "non-finite" in out[0].details["error"]
