"""Advantages: full-group statistics, Dr.GRPO, masks, degenerate inputs."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bppo.algorithms import group_advantages, group_stats, uniform_groups

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def groups(draw, binary=None):
    ng = draw(st.integers(1, 5))
    G = draw(st.integers(1, 9))
    is_binary = draw(st.booleans()) if binary is None else binary
    vals = st.sampled_from([0.0, 1.0]) if is_binary else st.floats(-5, 5, allow_nan=False, width=32)
    r = torch.tensor(draw(st.lists(st.lists(vals, min_size=G, max_size=G), min_size=ng, max_size=ng)),
                     dtype=torch.float64)
    v = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=G, max_size=G), min_size=ng, max_size=ng)))
    return r, v


@SETTINGS
@given(groups(), st.sampled_from(["grpo", "drgrpo"]))
def test_zero_group_mean_and_invalid_zero(data, mode):
    r, v = data
    a = group_advantages(r, mode=mode, valid=v)
    assert a.shape == r.shape and a.dtype == r.dtype
    assert torch.all(a[~v] == 0)
    for g in range(r.shape[0]):
        if v[g].any():
            assert abs(float(a[g][v[g]].sum())) < 1e-9 * max(1.0, float(r.abs().max()) * r.shape[1])


@SETTINGS
@given(groups())
def test_grpo_unit_population_std_on_nonuniform_groups(data):
    r, v = data
    a = group_advantages(r, mode="grpo", eps=0.0, valid=v)
    uni = uniform_groups(r, v)
    for g in range(r.shape[0]):
        x = a[g][v[g]]
        if uni[g]:
            assert torch.all(x == 0)
        else:
            assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-7


@SETTINGS
@given(groups())
def test_drgrpo_is_reward_minus_mean(data):
    r, v = data
    a = group_advantages(r, mode="drgrpo", valid=v)
    mean, _, n = group_stats(r, v)
    exp = torch.where(v, r - mean[:, None], torch.zeros_like(r))
    exp[uniform_groups(r, v)] = 0
    assert torch.allclose(a, exp, atol=1e-12)


@pytest.mark.parametrize("G", [2, 3, 5, 8, 16])
def test_binary_closed_form(G):
    for k in range(1, G):
        r = torch.tensor([[1.0] * k + [0.0] * (G - k)], dtype=torch.float64)
        a = group_advantages(r, eps=0.0)
        p = k / G
        assert torch.allclose(a[0, :k], torch.full((k,), math.sqrt((1 - p) / p), dtype=torch.float64))
        assert torch.allclose(a[0, k:], torch.full((G - k,), -math.sqrt(p / (1 - p)), dtype=torch.float64))


def test_eps_and_unbiased_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    a = group_advantages(r, eps=0.1)
    assert torch.allclose(a, (r - r.mean()) / (r.std(unbiased=False) + 0.1))
    b = group_advantages(r, eps=0.0, unbiased=True)
    assert torch.allclose(b, (r - r.mean()) / r.std(unbiased=True))
    _, std, _ = group_stats(torch.tensor([[3.0]]), unbiased=True)
    assert std.item() == 0.0


def test_degenerate_inputs():
    # G = 1: advantage 0, group uniform
    r = torch.tensor([[1.0], [0.0]])
    assert torch.equal(group_advantages(r), torch.zeros(2, 1))
    assert uniform_groups(r).all()
    # uniform groups with awkward floats are exactly 0
    r = torch.full((1, 3), 0.1)
    assert torch.equal(group_advantages(r), torch.zeros(1, 3))
    # empty inputs
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)
    assert group_advantages(torch.zeros(3, 0)).shape == (3, 0)
    # a group with no valid entry
    a = group_advantages(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), valid=torch.tensor([[0, 0], [1, 1]]).bool())
    assert torch.equal(a[0], torch.zeros(2)) and a[1, 0] > 0
    # integer rewards are accepted
    assert group_advantages(torch.tensor([[1, 0]])).dtype == torch.get_default_dtype()


def test_nan_rewards_raise_with_group_index():
    r = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    with pytest.raises(ValueError, match="group 1"):
        group_advantages(r)
    with pytest.raises(ValueError, match="group 0"):
        group_advantages(torch.tensor([[float("inf"), 0.0]]))
    # NaN padding in an invalid slot is fine
    a = group_advantages(r, valid=torch.tensor([[1, 1], [1, 0]]).bool())
    assert torch.isfinite(a).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.zeros(1, 2), mode="ppo")
    with pytest.raises(ValueError, match="num_groups, G"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="valid"):
        group_advantages(torch.zeros(2, 2), valid=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2, 2), eps=-1)


