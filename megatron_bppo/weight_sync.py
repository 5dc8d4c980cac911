"""Weight sync: the live Megatron model (any TP/PP/DP layout) -> the rollout engine, in buckets, never via disk.

    Megatron shards --(HFBridge.export_hf_weights: TP all-gather, PP broadcast from the owning stage,
                       HF names and fusion splits by mbridge)--> (hf_name, full tensor), same stream on every rank
      --(iter_buckets: pull tensors until bucket_bytes)--> one bucket in flight per rank
      --(RolloutEngine.update_weights: one lazy stream per sync)--> the engine shard on the same rank
                                        (vLLM re-fuses qkv / gate_up, re-shards for its own TP, re-packs on CPU)

Vocabulary: a learner padded for TP (model/bridge.py padded_vocab_size) exports embed_tokens / lm_head with the
checkpoint's own vocab_size rows (HFBridge.export_hf_weights refuses anything else), so the engine, built from the
unpadded HF config, holds no padded row and cannot sample one.

Transport: in-process, by reference, on every rank (each rank holds one engine shard, see
rollout/vllm_engine.py): the tensors the export yields are handed to vLLM's weight loaders as a Python
generator, which copy them into the engine's parameters. Nothing is serialized; no file, socket or
shared-memory segment is used, and no switch that lets the engine unpickle objects is needed. The export is
collective (every rank runs the same all-gathers and broadcasts), so every rank calls sync_weights with its
own engine shard at the same point.

Memory: at most one bucket of exported tensors is alive per rank (plus the one tensor that overflows it, and
the parts of one fused vLLM layer that vLLM buffers until the layer is complete); each tensor is released once
the engine has copied it. In-process the bucket only bounds that memory; it is also the unit a cross-process
transport (CUDA IPC / NCCL broadcast to engines on other processes) would ship, which is not built here.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

from .rollout.engine import RolloutEngine, WeightUpdateStats

DEFAULT_BUCKET_BYTES = 256 << 20


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream into lists of about `bucket_bytes` (a tensor larger than that is a bucket alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"rollout.bucket_bytes={bucket_bytes}: must be >= 1")
    bucket, size = [], 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor))
        size += tensor_bytes(tensor)
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class _Meter:
    """Counts buckets/bytes and the time spent pulling from the export (gathers and broadcasts)."""

    def __init__(self, named_tensors, bucket_bytes: int):
        self.source = iter(named_tensors)
        self.bucket_bytes = bucket_bytes
        self.export_seconds = 0.0
        self.buckets = self.max_bucket = 0

    def _timed_source(self):
        while True:
            start = time.perf_counter()
            try:
                item = next(self.source)
            except StopIteration:
                self.export_seconds += time.perf_counter() - start
                return
            self.export_seconds += time.perf_counter() - start
            yield item

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in iter_buckets(self._timed_source(), self.bucket_bytes):
            self.buckets += 1
            self.max_bucket = max(self.max_bucket, sum(tensor_bytes(t) for _, t in bucket))
            bucket.reverse()
            while bucket:                   # hand over and drop our reference, so the bucket drains
                yield bucket.pop()


def sync_weights(bridge, models, engine: RolloutEngine, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> WeightUpdateStats:
    """Push the learner's current weights into this rank's engine shard. Call on every rank.

    `models`: the unwrapped Megatron model chunks (Learner.unwrapped_models()). A sleeping engine is woken in
    two stages (weights, sync, then KV cache) so the KV cache is not resident while the tensors move.
    Returns tensors / bytes (as received on this rank), seconds (wall time of the whole sync), buckets,
    max_bucket_bytes, extra.export_seconds (time inside the bridge export: gathers and broadcasts).
    """
    started = time.perf_counter()
    meter = _Meter(bridge.export_hf_weights(models), bucket_bytes)
    if engine.is_sleeping:
        engine.wake_up(["weights"])
    stats = engine.update_weights(meter.stream())
    if engine.is_sleeping:
        engine.wake_up()
    stats.seconds = time.perf_counter() - started
    stats.buckets, stats.max_bucket_bytes = meter.buckets, meter.max_bucket
    stats.extra["export_seconds"] = meter.export_seconds
    return stats
