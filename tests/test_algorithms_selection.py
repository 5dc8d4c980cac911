"""Selection strategies: binary vs a brute-force reference, all, max-variance, registry, re-weighting."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bppo.algorithms import (SELECTORS, get_selector, group_advantages, register_selector,
                                      select_all, select_binary, weight_selected_advantages)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def batch(draw, max_g=9, graded=False):
    ng, G = draw(st.integers(0, 5)), draw(st.integers(1, max_g))
    cell = st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) if graded else st.sampled_from([0.0, 1.0]),
                     st.integers(0, 6), st.booleans() if draw(st.booleans()) else st.just(True))
    rows = draw(st.lists(st.lists(cell, min_size=G, max_size=G), min_size=ng, max_size=ng))
    r = torch.tensor([[c[0] for c in row] for row in rows], dtype=torch.float64).reshape(ng, G)
    L = torch.tensor([[c[1] for c in row] for row in rows], dtype=torch.long).reshape(ng, G)
    v = torch.tensor([[c[2] for c in row] for row in rows], dtype=torch.bool).reshape(ng, G)
    return r, L, v


def brute_binary(correct, L, v):
    out = []
    for g in range(correct.shape[0]):
        idx = [i for i in range(correct.shape[1]) if v[g, i]]
        cor = [i for i in idx if correct[g, i]]
        wrong = [i for i in idx if not correct[g, i]]
        if cor and wrong:
            pick = {min(cor, key=lambda i: (int(L[g, i]), i)), min(wrong, key=lambda i: (int(L[g, i]), i))}
        else:
            pick = set()
        out.append(pick)
    return out


@SETTINGS
@given(batch())
def test_binary_matches_brute_force(data):
    r, L, v = data
    c = (r > 0.5) & v
    res = get_selector("binary")(c, L, group_advantages(r, valid=v), v)
    ref = brute_binary(c, L, v)
    assert res.mask.dtype == torch.bool and res.mask.shape == r.shape
    for g, pick in enumerate(ref):
        assert set(res.mask[g].nonzero().flatten().tolist()) == pick
    k = res.counts
    assert k["groups_mixed"] + k["groups_all_correct"] + k["groups_all_wrong"] + k["groups_empty"] == k["groups"]
    assert k["selected"] == 2 * k["groups_mixed"] == 2 * k["groups_contributing"]
    assert k["selected_correct"] == k["selected_incorrect"] == k["groups_mixed"]


def test_binary_tie_break_and_single_class():
    c = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    L = torch.tensor([[3, 3, 2, 2], [1, 1, 1, 1], [1, 2, 3, 4]])
    res = select_binary(c, L, torch.zeros(3, 4))
    assert res.mask.tolist() == [[True, False, True, False], [False] * 4, [False] * 4]
    assert res.counts["groups_all_correct"] == 1 and res.counts["groups_all_wrong"] == 1


@SETTINGS
@given(batch())
def test_all_selects_every_valid(data):
    r, L, v = data
    c = (r > 0.5) & v
    res = select_all(c, L, group_advantages(r, valid=v), v)
    assert torch.equal(res.mask, v)
    assert res.counts["selected"] == int(v.sum())


@SETTINGS
@given(batch())
def test_max_variance_m2_equals_binary_for_binary_rewards(data):
    r, L, v = data
    c, a = (r > 0.5) & v, group_advantages(r, valid=v)
    assert torch.equal(get_selector("max_variance_pairs", m=2)(c, L, a, v).mask, select_binary(c, L, a, v).mask)


@SETTINGS
@given(batch(max_g=7, graded=True), st.integers(2, 4))
def test_max_variance_is_optimal(data, m):
    r, L, v = data
    c, a = (r >= 0.5) & v, group_advantages(r, mode="drgrpo", valid=v)
    res = get_selector("max_variance_pairs", m=m)(c, L, a, v)

    def var(ix):
        x = r[g, list(ix)]
        return float(((x - x.mean()) ** 2).mean())

    for g in range(r.shape[0]):
        idx = [i for i in range(r.shape[1]) if v[g, i]]
        chosen = res.mask[g].nonzero().flatten().tolist()
        if not idx or len(set(r[g, idx].tolist())) == 1:
            assert chosen == []
        elif len(idx) <= m:
            assert chosen == idx
        else:
            assert len(chosen) == m and set(chosen) <= set(idx)
            assert var(chosen) >= max(var(s) for s in itertools.combinations(idx, m)) - 1e-12


def test_registry():
    assert {"all", "binary", "max_variance_pairs"} <= set(SELECTORS)
    with pytest.raises(ValueError, match="known: .*binary"):
        get_selector("nope")
    with pytest.raises(ValueError, match="options"):
        get_selector("binary", m=3)
    with pytest.raises(ValueError, match="m must be"):
        get_selector("max_variance_pairs", m=1)(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.long),
                                                torch.zeros(1, 2), None)
    with pytest.raises(ValueError, match="already registered"):
        register_selector("all")(lambda *a: None)

    @register_selector("first_only_test")
    def first(correct, lengths, advantages, valid=None):
        return select_all(correct, lengths, advantages, valid)

    try:
        assert get_selector("first_only_test") is first
    finally:
        del SELECTORS["first_only_test"]


def test_shape_and_type_errors():
    c = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="lengths must have shape"):
        select_binary(c, torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer"):
        select_binary(c, torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_groups"):
        select_binary(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.long), torch.zeros(3))


def test_empty_inputs():
    for name in SELECTORS:
        res = get_selector(name)(torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.long),
                                 torch.zeros(0, 4), None)
        assert res.mask.shape == (0, 4) and res.counts["groups"] == 0


@SETTINGS
@given(batch())
def test_class_total_weighting(data):
    r, L, v = data
    c, a = (r > 0.5) & v, group_advantages(r, valid=v)
    res = select_binary(c, L, a, v)
    w = weight_selected_advantages(a, c, res.mask, v, pair_weighting="class_total")
    plain = weight_selected_advantages(a, c, res.mask, v)
    assert torch.equal(plain, torch.where(res.mask, a, torch.zeros_like(a)))
    for g in range(r.shape[0]):
        if res.mask[g].any():  # pair carries each class's GRPO total: sum_{i in class} A_i
            for cls in (c[g], v[g] & ~c[g]):
                assert torch.allclose(w[g][cls].sum(), a[g][cls].sum(), atol=1e-9)
    # with `all` selection class_total is the identity
    full = select_all(c, L, a, v).mask
    assert torch.allclose(weight_selected_advantages(a, c, full, v, "class_total"), a)
    with pytest.raises(ValueError, match="class_total"):
        weight_selected_advantages(a, c, full, v, "balanced")
