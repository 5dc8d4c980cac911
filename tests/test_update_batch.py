"""The update batch (batch.py) and what feeds it: pair weightings against GRPO by exact enumeration, the reward's own
`correct` flag, mini-batches by whole groups, the loss normaliser, and no prompt twice in one step."""
import itertools
import random

import pytest
import torch

from megatron_bppo.algorithms import PrefixRule, get_selector, group_advantages, weight_selected_advantages
from megatron_bppo.batch import Group, build_update_batch, loss_normalizer, split_batch
from megatron_bppo.config import AlgorithmConfig
from megatron_bppo.data import DatasetError, PromptSampler
from megatron_bppo.rollout.engine import Completion


def _group(gid, correct, lengths, rewards=None):
    completions = [Completion(i, list(range(10, 10 + n)), "", torch.zeros(n), "stop", i)
                   for i, n in enumerate(lengths)]
    rewards = rewards if rewards is not None else [float(c) for c in correct]
    return Group(gid, [1, 2, 3], "0", completions, list(rewards), [bool(c) for c in correct])


# ----------------------------------------------------------------------------------------- pair weightings
@pytest.mark.parametrize("G", [2, 3, 4, 5, 6, 8])
def test_pair_weightings_against_grpo_by_exact_enumeration(G):
    """For every class split k of G and random per-completion score vectors s_i, average the pair update over every
    (correct, incorrect) pair (a random pair, exactly): class_total == GRPO, contrast is parallel to GRPO
    (factor 1 / (2 G sigma^2)), none has the common-mode term (1/2 - p)(gbar_c + gbar_w) / sigma."""
    gen = torch.Generator().manual_seed(G)
    for k in range(1, G):
        correct = torch.tensor([[i < k for i in range(G)]])
        adv = group_advantages(correct.double(), eps=0.0)
        scores = torch.randn(G, 5, generator=gen, dtype=torch.float64)
        grpo = (adv[0, :, None] * scores).sum(0)
        pairs = list(itertools.product(range(k), range(k, G)))
        expected = {}
        for weighting in ("none", "class_total", "contrast"):
            total = torch.zeros(5, dtype=torch.float64)
            for c, w in pairs:
                mask = torch.zeros(1, G, dtype=torch.bool)
                mask[0, [c, w]] = True
                a = weight_selected_advantages(adv, correct, mask, None, weighting)
                assert abs(float(a.sum())) < 1e-9 or weighting == "none"          # zero-sum pairs
                total += (a[0, :, None] * scores).sum(0)
            expected[weighting] = total / len(pairs)
        p = k / G
        sigma = (p * (1 - p)) ** 0.5
        gbar_c, gbar_w = scores[:k].mean(0), scores[k:].mean(0)
        assert torch.allclose(expected["class_total"], grpo, atol=1e-9)
        assert torch.allclose(expected["contrast"], grpo / (2 * G * sigma ** 2), atol=1e-9)
        common = (0.5 - p) * (gbar_c + gbar_w) / sigma
        assert torch.allclose(expected["none"], 0.5 * (gbar_c - gbar_w) / sigma + common, atol=1e-9)
        if k * 2 != G:
            assert not torch.allclose(expected["none"] / expected["none"].norm(), grpo / grpo.norm(), atol=1e-3)


def test_pair_advantages_binary_closed_forms():
    correct = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]).bool()
    adv = group_advantages(correct.double(), eps=0.0)
    mask = get_selector("binary")(correct, torch.tensor([[5, 3, 9, 2, 4, 4, 4, 4]]), adv, None).mask
    assert mask[0].nonzero().flatten().tolist() == [1, 3]
    a_plus, a_minus = float(adv[0, 0]), float(adv[0, 2])
    none = weight_selected_advantages(adv, correct, mask, None, "none")[0]
    total = weight_selected_advantages(adv, correct, mask, None, "class_total")[0]
    contrast = weight_selected_advantages(adv, correct, mask, None, "contrast")[0]
    assert none[[1, 3]].tolist() == pytest.approx([a_plus, a_minus])
    assert total[[1, 3]].tolist() == pytest.approx([2 * a_plus, 6 * a_minus])
    assert contrast[[1, 3]].tolist() == pytest.approx([(a_plus - a_minus) / 2, -(a_plus - a_minus) / 2])
    all_mask = torch.ones_like(mask)
    for weighting in ("class_total", "contrast"):         # the identity for GRPO's `all` selector
        assert torch.allclose(weight_selected_advantages(adv, correct, all_mask, None, weighting), adv, atol=1e-12)


def test_random_pair_is_one_of_each_class_seeded_and_uniform():
    correct = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]]).bool()
    lengths = torch.full(correct.shape, 7)
    adv = group_advantages(correct.double())
    pick = get_selector("random_pair", seed=5)
    first = pick(correct, lengths, adv, None)
    assert torch.equal(first.mask, pick(correct, lengths, adv, None).mask)
    assert first.mask.sum(1).tolist() == [2, 0, 2]
    assert (first.mask & correct).sum(1).tolist() == [1, 0, 1]
    counts = torch.zeros(5)
    for seed in range(600):
        counts += get_selector("random_pair", seed=seed)(correct, lengths, adv, None).mask[0].double()
    assert counts[:3].min() > 150 and counts[3:].min() > 250          # ~200 each correct, ~300 each wrong


# ----------------------------------------------------------------------------------------- the update batch
def test_build_update_batch_uses_the_rewards_correct_flag():
    algo = AlgorithmConfig(name="bppo", prefix="full")
    # reward 0.3 marked correct by the reward function (a graded reward): a BPPO class of its own
    groups = [_group("a", [True, False, False, False], [4, 2, 6, 3], rewards=[0.3, 0.0, 0.0, 0.0])]
    batch = build_update_batch(groups, algo, PrefixRule(mode="full"), step=1)
    assert sorted(batch.origin) == [(0, 0), (0, 1)]
    assert batch.counts["mixed_groups"] == 1
    groups = [_group("a", [False] * 4, [4, 2, 6, 3], rewards=[0.9, 0.0, 0.0, 0.0])]   # 0.9 but not correct
    assert build_update_batch(groups, algo, PrefixRule(mode="full"), step=1).empty


@pytest.mark.parametrize("mode, keep", [("pair", {(0, 0): 2, (0, 1): 2, (1, 1): 5, (1, 3): 5}),
                                         ("to_correct", {(0, 0): 6, (0, 1): 2, (1, 1): 5, (1, 3): 5})])
def test_build_update_batch_cuts_the_pair_to_its_reference_length(mode, keep):
    """Sequence = prompt + the kept tokens; group 0's shortest incorrect (2) is shorter than its shortest correct
    (6), group 1's correct (5) shorter than its incorrect (9); the 1-token floor never binds here."""
    algo = AlgorithmConfig(name="bppo", prefix=mode, prefix_min_tokens=1)
    groups = [_group("a", [True, False, False, True], [6, 2, 4, 8]), _group("b", [False, True, True, False],
                                                                           [12, 5, 7, 9])]
    batch = build_update_batch(groups, algo, PrefixRule(mode=mode, min_tokens=1), step=1)
    assert dict(zip(batch.origin, batch.keep_lengths)) == keep
    for (gi, ci), seq, k in zip(batch.origin, batch.sequences, batch.keep_lengths):
        assert seq.tolist() == [1, 2, 3] + list(groups[gi].completions[ci].token_ids[:k])
    assert batch.counts["selected_response_tokens_full"] == 6 + 2 + 5 + 9


def _batch(num_groups=6, algo=None):
    algo = algo or AlgorithmConfig(name="grpo")
    groups = [_group(f"g{g}", [i % 2 == g % 2 for i in range(4)], [3 + g, 5, 2, 4 + g]) for g in range(num_groups)]
    return build_update_batch(groups, algo, PrefixRule(mode="full"), step=1)


def test_split_batch_keeps_groups_whole_and_shuffles_by_seed():
    batch = _batch()
    assert len(batch.sequences) == 24
    parts = split_batch(batch, 2, seed=0)
    assert len(parts) == 2
    seen = [o for part in parts for o in part.origin]
    assert sorted(seen) == sorted(batch.origin)                        # every sequence exactly once
    for part in parts:
        groups = {gi for gi, _ in part.origin}
        assert len(part.origin) == 4 * len(groups)                     # whole groups only
        assert part.rollout_sequences == pytest.approx(batch.rollout_sequences * len(groups) / 6)
    orders = {tuple(sorted({gi for gi, _ in split_batch(batch, 2, seed=s)[0].origin})) for s in range(20)}
    assert len(orders) > 3                                             # the seed changes the deal
    assert [p.origin for p in split_batch(batch, 2, seed=7)] == [p.origin for p in split_batch(batch, 2, seed=7)]
    assert len(split_batch(batch, 10, seed=0)) == 6                    # never more mini-batches than groups
    assert split_batch(batch, 1, seed=0) == [batch]


def test_bppo_pairs_never_split_across_mini_batches():
    batch = _batch(algo=AlgorithmConfig(name="bppo", prefix="full"))
    assert len(batch.sequences) == 12
    for seed in range(10):
        for part in split_batch(batch, 3, seed):
            groups = [gi for gi, _ in part.origin]
            assert all(groups.count(g) == 2 for g in groups)


def test_loss_normalizer_trained_and_rollout():
    batch = _batch(algo=AlgorithmConfig(name="bppo", prefix="full"))
    assert loss_normalizer(batch, "token-mean") == batch.tokens
    assert loss_normalizer(batch, "seq-mean-token-mean") == 12
    assert loss_normalizer(batch, "token-mean", "rollout") == sum(3 + g + 5 + 2 + 4 + g for g in range(6))
    assert loss_normalizer(batch, "seq-mean-token-mean", "rollout") == 24


# ----------------------------------------------------------------------------------------- prompts per step
@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_gsm8k_sized_sampler_never_repeats_a_prompt_in_a_step(data_seed):
    """7473 prompts, 64 per step plus draw-more, 300 steps (two and a half epochs), a resume half way."""
    extra = random.Random(data_seed)

    def step(sampler):
        taken = set()
        for n in (64, extra.randint(0, 32)):
            got = sampler.next_indices(n, exclude=taken)
            assert len(got) == n and not taken & set(got)
            taken.update(got)
        return sorted(taken)

    sampler = PromptSampler(7473, seed=data_seed)
    visits = []
    for _ in range(150):
        visits.append(step(sampler))
    state = sampler.state_dict()
    rng_state = extra.getstate()
    tail = [step(sampler) for _ in range(150)]
    resumed = PromptSampler(7473, seed=data_seed)
    resumed.load_state_dict(state)
    extra.setstate(rng_state)
    assert [step(resumed) for _ in range(150)] == tail
    assert sampler.epoch >= 2
    flat = [i for s in visits + tail for i in s]
    assert len(set(flat)) == 7473                                      # every prompt is visited


def test_sampler_refuses_more_prompts_than_it_has():
    sampler = PromptSampler(10, seed=0)
    assert len(sampler.next_indices(10)) == 10
    with pytest.raises(DatasetError, match="data.prompts_per_step"):
        sampler.next_indices(6, exclude=set(range(5)))
