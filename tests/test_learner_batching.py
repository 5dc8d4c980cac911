"""The learner's batching rules (pure functions): DP balance, packing under the token budget, the padding that
sequence parallelism needs, and which device a rank (and its vLLM engine) uses."""
import pytest
import torch

from megatron_bppo.learner import collate, pack_by_length, split_over_dp


def test_split_over_dp_balances_tokens_and_keeps_every_sequence():
    lengths = [50, 10, 40, 30, 20, 60]
    shares = split_over_dp(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(6))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 10


def test_pack_by_length_respects_the_token_budget():
    lengths = [50, 10, 40, 30, 20, 60]
    groups = pack_by_length(list(range(6)), lengths, token_budget=100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * max(lengths[i] for i in g) <= 100 for g in groups)


@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_collate_pads_to_a_multiple_of_the_tp_size(multiple):
    """Sequence parallelism splits the sequence dimension over TP ranks (seq_len % tp == 0 in megatron-core):
    micro-batches are padded up to a multiple of TP, after every real token; lengths and masks stay exact."""
    seqs = [torch.arange(1, 8), torch.arange(1, 4)]                     # 7 and 3 tokens
    fields = [{"adv": torch.full((6,), 2.0)}, {"adv": torch.full((2,), -1.0)}]
    mb = collate([0, 1], seqs, fields, pad_id=0, device="cpu", multiple=multiple)
    width = {1: 7, 2: 8, 4: 8}[multiple]
    assert mb.tokens.shape == (2, width) and mb.fields["adv"].shape == (2, width - 1)
    assert mb.tokens[0, :7].tolist() == list(range(1, 8)) and mb.tokens[1, :3].tolist() == [1, 2, 3]
    assert mb.tokens[1, 3:].eq(0).all() and mb.lengths.tolist() == [7, 3]
    assert mb.target_mask.sum(1).tolist() == [6, 2]
    assert mb.fields["adv"][1, 2:].eq(0).all()


def test_device_index_is_the_local_rank_modulo_visible_devices():
    """Megatron's device and vLLM's LOCAL_RANK alike: srun --gpus-per-task=1 shows each task one device."""
    from megatron_bppo.platform import device_index

    assert device_index(3, 1) == 0 and device_index(5, 4) == 1 and device_index(2, 8) == 2
    assert device_index(2, 0) == 2                     # CPU: the local rank as is
