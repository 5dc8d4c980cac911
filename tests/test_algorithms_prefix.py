"""Prefix rule: bounds, modes, schedules, validation, and the prefix k fitting the token lists it cuts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bppo.algorithms import PrefixRule

SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def rules(draw):
    mode = draw(st.sampled_from(["ratio", "fixed", "full"]))
    lo = draw(st.integers(1, 64))
    hi = draw(st.one_of(st.none(), st.integers(lo, 512)))
    kw = dict(mode=mode, min_tokens=lo, max_tokens=hi)
    if mode == "ratio":
        kw["ratio"] = draw(st.floats(1e-3, 1.0))
    if mode == "fixed":
        kw["tokens"] = draw(st.integers(1, 600))
    if mode != "full" and draw(st.booleans()):
        pts = sorted(draw(st.lists(st.integers(0, 100), min_size=1, max_size=4)))
        vals = st.floats(1e-3, 1.0) if mode == "ratio" else st.integers(1, 600)
        kw["schedule"] = tuple((s, draw(vals)) for s in pts)
    return PrefixRule(**kw)


@SETTINGS
@given(rules(), st.lists(st.integers(0, 5000), min_size=0, max_size=20), st.integers(0, 150))
def test_bounds(rule, lengths, step):
    L = torch.tensor(lengths, dtype=torch.long)
    k = rule.lengths(L, step)
    assert k.dtype == torch.long and k.shape == L.shape
    assert torch.all(torch.where(L > 0, (k >= 1) & (k <= L), k == 0))  # 1 <= k <= L; k = 0 for L = 0
    assert torch.all(k[L == 0] == 0)
    assert torch.all((k >= 1)[L > 0]) and torch.all(k <= L)
    if rule.mode == "full":
        assert torch.equal(k, L)
    else:
        assert torch.all(k >= torch.clamp(L, max=rule.min_tokens))
        if rule.max_tokens is not None:
            assert torch.all(k <= rule.max_tokens)
        if rule.mode == "ratio":  # monotone in L
            s = torch.sort(L).values
            assert torch.all(torch.diff(rule.lengths(s, step)) >= 0)


def test_ratio_formula_and_float_slack():
    L = torch.tensor([10, 20, 3, 7, 1])
    assert PrefixRule(mode="ratio", ratio=0.3, min_tokens=1).lengths(L).tolist() == [3, 6, 1, 3, 1]
    assert PrefixRule(mode="ratio", ratio=0.5, min_tokens=1).lengths(L).tolist() == [5, 10, 2, 4, 1]
    assert PrefixRule(mode="ratio", ratio=1.0, min_tokens=1).lengths(L).tolist() == L.tolist()
    for r in (0.1, 0.2, 0.3, 0.7, 0.9):
        rule = PrefixRule(mode="ratio", ratio=r, min_tokens=1)
        for n in range(1, 300):
            assert rule.lengths(torch.tensor([n])).item() == max(1, math.ceil(round(r * n, 9)))


def test_floor_ceiling_and_modes():
    L = torch.tensor([0, 5, 40, 100, 1000])
    assert PrefixRule(mode="ratio", ratio=0.5, min_tokens=32).lengths(L).tolist() == [0, 5, 32, 50, 500]
    capped = PrefixRule(mode="ratio", ratio=0.5, min_tokens=32, max_tokens=256)
    assert capped.lengths(L).tolist() == [0, 5, 32, 50, 256]
    assert PrefixRule(mode="fixed", tokens=64).lengths(L).tolist() == [0, 5, 40, 64, 64]
    assert PrefixRule(mode="full", max_tokens=50).lengths(L).tolist() == L.tolist()  # bounds ignored in full
    assert PrefixRule().lengths(L).tolist() == [0, 5, 32, 50, 500]  # defaults: ratio 0.5, floor 32


def test_schedule():
    rule = PrefixRule(mode="ratio", min_tokens=1, schedule=((10, 1.0), (20, 0.5)))
    L = torch.tensor([100])
    assert [rule.lengths(L, s).item() for s in (0, 10, 15, 20, 99)] == [100, 100, 75, 50, 50]
    jump = PrefixRule(mode="fixed", min_tokens=1, schedule=((0, 10), (5, 10), (5, 20)))
    assert [jump.lengths(L, s).item() for s in (0, 4, 5, 6)] == [10, 10, 20, 20]
    assert PrefixRule(min_tokens=1, schedule=[(10, 1.0), (20, 0.5)]).lengths(L, 15).item() == 75  # a list works
    with pytest.raises(ValueError, match="step"):
        rule.lengths(L)


@pytest.mark.parametrize("kw, field", [
    (dict(mode="suffix"), "mode"), (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(ratio=None), "ratio"), (dict(min_tokens=0), "min_tokens"), (dict(min_tokens=10, max_tokens=5), "max_tokens"),
    (dict(mode="fixed"), "tokens"), (dict(mode="fixed", tokens=0), "tokens"),
    (dict(schedule=((5, 0.5), (1, 0.7))), "schedule"), (dict(schedule=((0, 2.0),)), "schedule value"),
    (dict(schedule=()), "schedule"), (dict(mode="full", schedule=((0, 1.0),)), "schedule"),
])
def test_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        PrefixRule(**kw)


def test_bad_lengths():
    with pytest.raises(ValueError, match="integer"):
        PrefixRule().lengths(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=">= 0"):
        PrefixRule().lengths(torch.tensor([-1]))
    assert PrefixRule().lengths(torch.zeros(0, dtype=torch.long)).shape == (0,)


@SETTINGS
@given(rules(), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40)), max_size=8))
def test_cut_with_rule(rule, shapes):
    seqs = [list(range(p + n)) for p, n in shapes]
    P = [p for p, _ in shapes]
    L = [n for _, n in shapes]
    k = rule.lengths(torch.tensor(L, dtype=torch.long), 3)
    for s, p, n, kk in zip(seqs, P, L, k.tolist()):
        assert (1 <= kk <= n) if n > 0 else kk == 0   # the cut never reaches past the response
        o = s[: p + kk]                               # what batch.build_update_batch trains on
        assert o[:p] == s[:p] and o[p:] == s[p: p + kk] and len(o) - p == kk
