"""Rewards are scored once and shared: ranks whose reward function disagrees (math-verify's wall-clock timeouts
count as wrong, so a slow rank scores differently) still end with identical verdicts."""
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

PAIRS = [(f"The answer is {i % 3}", "1") for i in range(11)]


def _rank_dependent_reward(text, reference):
    """Correct only where scored on rank 0: as if rank 1 were so slow that every verification timed out."""
    from megatron_bppo.rewards import RewardResult

    _rank_dependent_reward.calls += 1
    right = text.endswith(reference) and dist.get_rank() == 0
    return RewardResult(1.0 if right else 0.0, right)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_bppo.collect import score_once

    _rank_dependent_reward.calls = 0
    verdicts = score_once(_rank_dependent_reward, PAIRS, {})
    out[rank] = (verdicts, _rank_dependent_reward.calls)
    dist.destroy_process_group()


def test_every_rank_gets_the_same_verdicts_and_each_pair_is_scored_once():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
        (v0, calls0), (v1, calls1) = out[0], out[1]
    assert v0 == v1 and len(v0) == len(PAIRS)
    assert calls0 + calls1 == len(PAIRS) and calls0 == 6 and calls1 == 5
    # pairs 0, 2, 4, ... were scored on rank 0 (right when the text ends in the reference), the others on rank 1
    assert [ok for _, ok in v0] == [i % 2 == 0 and i % 3 == 1 for i in range(len(PAIRS))]
