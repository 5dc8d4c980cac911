"""One learner process for scripts/gpu_check.sh (world size 1, or under torchrun): HF parity, training steps, and a
save / resume of the distributed optimizer, at one dtype, on the platform init_platform picks (CUDA + NCCL there).

    python scripts/gpu_check_worker.py --hf H --dtype float32|bfloat16 --out R.json [--save-at 1 --ckpt C]
        [--resume C/iter_0000001] [--steps 3]

Writes R.json (rank 0): max / mean |log p_megatron - log p_HF| against HF in fp32, and, at bf16, against HF in bf16
too; each step's loss and grad norm on a fixed batch; the optimizer classes megatron-core built (DistributedOptimizer
over TE's FusedAdam, Apex's, or torch's Adam); whether the TransformerEngine spec is in use; with --save-at the eval
log-prob sum at the save and the save's seconds; with --resume the step loaded and the eval sum right after loading.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_bppo.testing.learner_checks import fixed_sequences, resume_for_check, train_for_check  # noqa: E402
from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402




def hf_logprobs(path, seqs, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            s = s.to(device)
            logits = model(s[None]).logits[0, :-1].float()
            out.append(logits.log_softmax(-1).gather(1, s[1:, None])[:, 0].cpu())
    del model
    return out


def diff(a, b):
    d = torch.cat([(x.double().cpu() - y.double().cpu()).abs() for x, y in zip(a, b)])
    return float(d.max()), float(d.mean())


def optimizer_classes(optimizer) -> list:
    names, todo, seen = [], [optimizer], set()
    while todo:
        o = todo.pop(0)
        if id(o) in seen:
            continue
        seen.add(id(o))
        names.append(type(o).__name__)
        todo += list(getattr(o, "chained_optimizers", []) or [])
        inner = getattr(o, "optimizer", None)
        if inner is not None and inner is not o:
            todo.append(inner)
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume", default="")
    args = ap.parse_args()

    from megatron_bppo.checkpointing import save_checkpoint
    from megatron_bppo.distributed import destroy_distributed
    from megatron_bppo.learner import build_learner
    from megatron_bppo.platform import current_platform

    started = time.perf_counter()
    launch, bridge, learner, _ = build_learner(
        ModelConfig(path=args.hf, dtype=args.dtype), ParallelConfig(),
        OptimConfig(lr=1e-2, use_distributed_optimizer=True), LearnerConfig(micro_batch_tokens=64, max_seq_len=64))
    platform = current_platform()
    result = {"dtype": args.dtype, "device": str(platform.device), "backend": platform.backend,
              "gpu": torch.cuda.get_device_name(platform.device) if platform.is_cuda else None,
              "optimizer": optimizer_classes(learner.optimizer),
              "transformer_engine_spec": bool(getattr(bridge, "use_te", False)),
              "build_s": round(time.perf_counter() - started, 1)}
    rank0 = launch.rank == 0
    seqs = fixed_sequences(bridge.hf_config.vocab_size)
    mine = learner.compute_logprobs(seqs)
    if rank0 and not args.resume:
        result["logprob_vs_hf_fp32"] = diff(mine, hf_logprobs(args.hf, seqs, torch.float32, platform.device))
        if args.dtype == "bfloat16":
            result["logprob_vs_hf_bf16"] = diff(mine, hf_logprobs(args.hf, seqs, torch.bfloat16, platform.device))

    start = 0
    if args.resume:
        start, loaded = resume_for_check(learner, args.resume, seqs)
        result.update(loaded)

    def save(step):
        t = time.perf_counter()
        save_checkpoint(args.ckpt, step, learner.models, learner.optimizer, learner.scheduler, hf_source_dir=args.hf)
        return {"save_s": round(time.perf_counter() - t, 2)}

    result.update(train_for_check(learner, seqs, start, args.steps, args.save_at, save))
    if platform.is_cuda:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(platform.device) / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - started, 1)
    if rank0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
