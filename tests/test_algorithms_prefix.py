"""Prefix rule: bounds, modes, schedules, validation, and the prefix k fitting the token lists it cuts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import itertools

from megatron_bppo.algorithms import PrefixRule, select_binary

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
    (dict(mode="pair", schedule=((0, 0.5),)), "schedule"), (dict(mode="to_correct", schedule=((0, 0.5),)), "schedule"),
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


# ------------------------------------------------------------------------------ pair modes (the selected pair)
@pytest.mark.parametrize("G", [2, 3, 4])
@pytest.mark.parametrize("floor", [1, 6])
def test_pair_modes_by_exact_enumeration(G, floor):
    """Every length assignment in {1, 3, 7, 9}^G and every verdict pattern: on BPPO's pair, `pair` keeps
    min(L, max(min(L+, L-), floor)) of each member, `to_correct` min(L, max(L+, floor)); unselected get 0."""
    rules = {m: PrefixRule(mode=m, min_tokens=floor) for m in ("pair", "to_correct", "ratio", "full")}
    for lens in itertools.product((1, 3, 7, 9), repeat=G):
        L = torch.tensor([lens])
        for verdicts in itertools.product((False, True), repeat=G):
            correct = torch.tensor([verdicts])
            mask = select_binary(correct, L, torch.zeros(1, G), None).mask
            k = {m: r.group_lengths(L, correct, mask).tolist()[0] for m, r in rules.items()}
            if not 0 < sum(verdicts) < G:
                assert all(v == [0] * G for v in k.values())        # no pair: nothing trained
                continue
            plus = min(n for n, c in zip(lens, verdicts) if c)
            minus = min(n for n, c in zip(lens, verdicts) if not c)
            for i, (n, sel) in enumerate(zip(lens, mask[0].tolist())):
                expect_pair = min(n, max(min(plus, minus), floor)) if sel else 0
                expect_correct = min(n, max(plus, floor)) if sel else 0
                assert (k["pair"][i], k["to_correct"][i]) == (expect_pair, expect_correct), (lens, verdicts, i)
                assert k["full"][i] == (n if sel else 0)                 # per-response modes: as lengths()
                assert k["ratio"][i] == (rules["ratio"].lengths(torch.tensor([n]))[0].item() if sel else 0)
            # the shorter member is whole under `pair`; the correct one is whole under `to_correct`
            sel = [i for i in range(G) if mask[0, i]]
            assert max(k["pair"][i] == lens[i] for i in sel)
            assert all(k["to_correct"][i] == lens[i] for i in sel if verdicts[i])


def test_pair_modes_groups_without_their_member_and_bounds():
    L = torch.tensor([[30, 10, 50, 0], [8, 40, 20, 5]])
    correct = torch.tensor([[True, False, False, False], [False, False, True, False]])
    mask = torch.tensor([[True, True, False, False], [False, True, False, False]])   # row 1: no correct selected
    assert PrefixRule(mode="pair", min_tokens=4).group_lengths(L, correct, mask).tolist() == [[10, 10, 0, 0],
                                                                                                 [0, 40, 0, 0]]
    assert PrefixRule(mode="to_correct", min_tokens=4).group_lengths(L, correct, mask).tolist() == [[30, 10, 0, 0],
                                                                                                       [0, 40, 0, 0]]
    capped = PrefixRule(mode="to_correct", min_tokens=4, max_tokens=20)               # the ceiling still applies
    assert capped.group_lengths(L, correct, mask).tolist() == [[20, 10, 0, 0], [0, 20, 0, 0]]
    for shape in ((0, 0), (3, 0), (0, 4)):                                          # no group, no completion
        empty = torch.zeros(shape, dtype=torch.long)
        assert PrefixRule(mode="pair").group_lengths(empty, empty.bool(), empty.bool()).shape == shape
    with pytest.raises(ValueError, match="pass reference"):
        PrefixRule(mode="pair").lengths(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="one shape"):
        PrefixRule(mode="pair").group_lengths(L, correct[:1], mask)
