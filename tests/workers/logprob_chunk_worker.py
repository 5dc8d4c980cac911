"""Chunked log-probs (learner.logprob_chunk_tokens > 0) against the whole-micro-batch logits (= 0), one launch.

    torchrun --nproc-per-node N logprob_chunk_worker.py --hf H --tp T --pp P [--dtype bfloat16] --out result.json

One Learner; for each chunk size (0 first: the reference) it computes the eval log-probs of fixed sequences and the
gradient of a token-mean NLL (Learner.local_gradients, nothing applied), and reports max |chunked - reference| over
every rank: log-probs absolute and relative to max(1, |reference|) (one fp32 ulp of a log-prob near -20 is 1.9e-6),
gradients relative to the reference's largest |gradient|. --chunks: 1 (one token per chunk), 7 (uneven chunks
across sequence boundaries), 1024 (one chunk per micro-batch here: the default's case).
With --sp-direct (TP >= 2): chunked_token_logprobs itself under sequence parallelism on a random [S/tp, b, h]
shard and a vocab-parallel weight (the CPU model never runs with sequence parallelism: torch norms lack it),
against token_logprobs of the full product, values and input/weight gradients.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from megatron_bppo.testing.learner_checks import fixed_sequences, nll_loss_fn  # noqa: E402



def max_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def sp_direct(chunk: int) -> dict:
    """chunked_token_logprobs with sequence_parallel=True vs token_logprobs on the full logits, same inputs."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megatron_bppo.learner import chunked_token_logprobs, token_logprobs

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(3)
    S, b, h, vocab = 12, 3, 16, 40                      # vocab 40 of 2 x 24 columns: the last 8 are padding
    hidden_full = torch.randn(S, b, h, generator=g)
    weight_full = torch.randn(2 * 24, h, generator=g) * 0.3
    tokens = torch.randint(0, vocab, (b, S), generator=g)
    lengths = torch.tensor([12, 7, 2])
    width = weight_full.shape[0] // tp
    hidden = hidden_full[rank * S // tp: (rank + 1) * S // tp].clone().requires_grad_(True)
    weight = weight_full[rank * width: (rank + 1) * width].clone().requires_grad_(True)
    lp = chunked_token_logprobs(hidden, weight, tokens, lengths, 0.7, vocab, chunk, sequence_parallel=True)
    mask = (torch.arange(S - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)).float()
    (lp * mask * torch.linspace(0.5, 1.5, S - 1)).sum().backward()

    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref_weight = weight.detach().clone().requires_grad_(True)
    full = gather_from_sequence_parallel_region(ref_hidden)                 # the output layer's own SP input
    logits = torch.matmul(full, ref_weight.t()).transpose(0, 1)             # [b, S, V/tp]
    ref = token_logprobs(logits, tokens, 0.7, vocab)
    (ref * mask * torch.linspace(0.5, 1.5, S - 1)).sum().backward()
    return {"logprob": max_over_ranks(float(((lp - ref) * mask).abs().max())),
            "hidden_grad": max_over_ranks(float((hidden.grad - ref_hidden.grad).abs().max())),
            "weight_grad": max_over_ranks(float((weight.grad - ref_weight.grad).abs().max())),
            "padding_zero": bool(float((lp * (1 - mask)).abs().max()) == 0.0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunks", default="1,7,1024")
    ap.add_argument("--sp-direct", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_bppo.distributed import destroy_distributed
    from megatron_bppo.learner import build_learner

    launch, bridge, learner, _ = build_learner(
        ModelConfig(path=args.hf, dtype=args.dtype), ParallelConfig(tp=args.tp, pp=args.pp),
        OptimConfig(lr=1e-2, use_distributed_optimizer=False),
        LearnerConfig(micro_batch_tokens=64, max_seq_len=64, logprob_chunk_tokens=0))
    seqs = fixed_sequences(bridge.hf_config.vocab_size)
    loss_fn = nll_loss_fn(sum(len(s) - 1 for s in seqs))
    fields = [{} for _ in seqs]

    def measure():
        logprobs = learner.compute_logprobs(seqs)
        grads = learner.local_gradients(seqs, fields, loss_fn, select=lambda name: True)
        return logprobs, grads

    ref_lp, ref_grads = measure()
    scale = max_over_ranks(max(float(g.abs().max()) for g in ref_grads.values()))
    result = {"layout": [args.tp, args.pp, launch.world_size], "dtype": args.dtype,
              "params": len(ref_grads), "grad_scale": scale, "chunks": {}}
    for chunk in [int(c) for c in args.chunks.split(",")]:
        learner.cfg.logprob_chunk_tokens = chunk
        lp, grads = measure()
        assert sorted(grads) == sorted(ref_grads)
        result["chunks"][str(chunk)] = {
            "logprob_maxdiff": max_over_ranks(max(float((a - b).abs().max()) for a, b in zip(lp, ref_lp))),
            "logprob_maxdiff_rel": max_over_ranks(max(float(((a - b).abs() / b.abs().clamp_min(1.0)).max())
                                                      for a, b in zip(lp, ref_lp))),
            "grad_maxdiff_rel": max_over_ranks(max(float((grads[k] - ref_grads[k]).abs().max())
                                                   for k in ref_grads)) / scale}
    if args.sp_direct:
        result["sp_direct"] = {str(chunk): sp_direct(chunk) for chunk in (5, 1024)}
    if launch.rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
