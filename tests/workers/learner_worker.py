"""One torchrun launch, many checks: run by tests/test_learner_parity.py at several TP/PP/DP layouts.

    torchrun --nproc-per-node N learner_worker.py --hf H --tp T --pp P --out result.json
        [--save-at 1 --ckpt C] [--resume C] [--engine]

Writes (rank 0) a JSON with: logprob max|diff| vs HF, export max|diff| (and shapes) vs the HF files, per-step losses
of a fixed training batch, and, when resuming from a checkpoint, the eval log-prob sum right after loading; the
padded vocabulary rows' largest |value| after training (0 when nothing is padded). --engine: a vLLM engine per rank
(random weights), synced from the trained learner; engine vs learner log-probs.
Final weights after training are written as safetensors beside the JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron_bppo.testing.learner_checks import fixed_sequences, resume_for_check, train_for_check  # noqa: E402
from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402

STEPS = 3




def padded_rows(bridge, learner) -> dict:
    """Largest |value| in the padded vocabulary rows of the embedding / output layer shards, over all ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    worst = torch.zeros(1, device=learner.device)
    for model in learner.unwrapped_models():
        for name, p in model.named_parameters():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                start = ps.get_tensor_model_parallel_rank() * p.shape[0]
                real = min(max(bridge.vocab_size - start, 0), p.shape[0])
                if real < p.shape[0]:
                    worst = torch.maximum(worst, p.detach()[real:].abs().max().float().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"vocab_size": bridge.vocab_size, "padded_vocab_size": bridge.padded_vocab_size,
            "padded_rows_maxabs": float(worst)}


def engine_check(hf, bridge, learner, seqs) -> float:
    """vLLM engine on every rank with random weights -> sync from the learner -> max |engine - learner| log-prob."""
    from megatron_bppo.config import RolloutConfig
    from megatron_bppo.rollout import VLLMEngine
    from megatron_bppo.weight_sync import sync_weights

    engine = VLLMEngine(hf, RolloutConfig(max_model_len=64, max_num_seqs=8, kv_cache_memory_bytes=16 << 20,
                                          load_format="dummy", seed=0))
    sync_weights(bridge, learner.unwrapped_models(), engine)
    mine = learner.compute_logprobs(seqs)
    theirs = engine.score(seqs)
    engine.close()
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(mine, theirs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")            # saved fully_reshardable (resumed at other layouts)
    ap.add_argument("--ckpt-dp", default="")         # the same step also saved dp_reshardable
    ap.add_argument("--resume", default="")
    ap.add_argument("--dist-opt", type=int, default=1)
    ap.add_argument("--engine", action="store_true")
    args = ap.parse_args()

    from megatron_bppo.checkpointing import save_checkpoint
    from megatron_bppo.distributed import destroy_distributed
    from megatron_bppo.learner import build_learner

    launch, bridge, learner, _ = build_learner(
        ModelConfig(path=args.hf), ParallelConfig(tp=args.tp, pp=args.pp),
        OptimConfig(lr=1e-2, use_distributed_optimizer=bool(args.dist_opt)),
        LearnerConfig(micro_batch_tokens=64, max_seq_len=64))
    seqs = fixed_sequences(bridge.hf_config.vocab_size)
    result = {"layout": [args.tp, args.pp, launch.world_size]}
    rank0 = launch.rank == 0

    logprobs = learner.compute_logprobs(seqs)
    if rank0:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        worst = 0.0
        with torch.no_grad():
            for s, lp in zip(seqs, logprobs):
                ref = hf(s[None]).logits[0, :-1].float().log_softmax(-1).gather(1, s[1:, None])[:, 0]
                worst = max(worst, (ref - lp.cpu()).abs().max().item())
        result["logprob_maxdiff_vs_hf"] = worst
        original = {k: v for f in os.listdir(args.hf) if f.endswith(".safetensors")
                    for k, v in load_file(os.path.join(args.hf, f)).items()}
    exported = dict(bridge.export_hf_weights(learner.unwrapped_models()))
    if rank0:
        result["export_names_equal"] = sorted(exported) == sorted(original)
        result["export_shapes_equal"] = all(exported[k].shape == original[k].shape for k in original if k in exported)
        result["export_maxdiff"] = max((exported[k].float().cpu() - original[k].float()).abs().max().item()
                                       for k in original if k in exported)

    start = 0
    if args.resume:
        start, loaded = resume_for_check(learner, args.resume, seqs)
        result.update(loaded)

    def save(step):
        save_checkpoint(args.ckpt, step, learner.models, learner.optimizer, learner.scheduler,
                        hf_source_dir=args.hf, optimizer_format="fully_reshardable")
        if args.ckpt_dp:
            save_checkpoint(args.ckpt_dp, step, learner.models, learner.optimizer, learner.scheduler,
                            hf_source_dir=args.hf, optimizer_format="dp_reshardable")

    result.update(train_for_check(learner, seqs, start, STEPS, args.save_at, save))
    result["padded_vocab"] = padded_rows(bridge, learner)
    final = dict(bridge.export_hf_weights(learner.unwrapped_models()))
    if args.engine:
        result["engine_maxdiff"] = engine_check(args.hf, bridge, learner, seqs)
    if rank0:
        from safetensors.torch import save_file

        save_file({k: v.cpu().contiguous() for k, v in final.items()}, args.out + ".final.safetensors")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
