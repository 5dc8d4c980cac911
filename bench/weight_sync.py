"""Weight sync throughput: real SmolLM2-135M (fp32) from a Megatron learner at TP1 and PP2 into vLLM, against a
plain memcpy of the same bytes measured in the same processes.

    python bench/weight_sync.py [--layouts tp1,pp2] [--repeats 3] [--bucket-mb 256]

Each layout is one launch (TP1: one process; PP2: torchrun, 2 ranks, one engine per rank). In each process:
the Megatron model from the HF dir, a vLLM engine started with random weights (load_format=dummy), one sync
that must make the engine's log-probs equal the learner's (checked), then `repeats` timed syncs and
`repeats` timed memcpys (torch `copy_` of every exported tensor into a preallocated tensor of the same shape,
one thread like the ranks). Reported per layout: bytes received per rank, best sync time, bytes/s, the same
for memcpy, and the ratio sync/memcpy throughput (goal >= 0.5), plus how the sync time splits into the bridge
export (TP gather / PP broadcast) and the engine load (vLLM's loaders, re-fusing, CPU re-packing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAYOUTS = {"tp1": (1, 1, 1), "pp2": (1, 2, 2)}          # name -> (tp, pp, processes)


def worker(args):
    import torch
    import torch.distributed as dist

    from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig
    from megatron_bppo.distributed import destroy_distributed
    from megatron_bppo.learner import Learner
    from megatron_bppo.model.bridge import open_model
    from megatron_bppo.rollout import VLLMEngine
    from megatron_bppo.weight_sync import sync_weights

    launch, bridge = open_model(ModelConfig(path=args.hf), ParallelConfig(tp=args.tp, pp=args.pp))
    # forward-only (no DDP buffers, no optimizer): the sync reads the weights, nothing trains
    learner = Learner(bridge.build(), OptimConfig(), LearnerConfig(micro_batch_tokens=256, max_seq_len=256),
                      trainable=False)
    models = learner.unwrapped_models()
    engine = VLLMEngine(args.hf, RolloutConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
                                               load_format="dummy"))
    bucket = args.bucket_mb << 20
    out = {"layout": args.name, "world_size": launch.world_size, "engine_start_s": engine.start_seconds}

    # correctness: random engine weights -> one sync -> same log-probs as the learner
    seqs = [torch.randint(3, bridge.hf_config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
            for n in (40, 64)]
    first = sync_weights(bridge, models, engine, bucket)
    out["first_sync"] = first.as_dict()
    out["logprob_maxdiff"] = max(float((a - b).abs().max()) for a, b in
                                 zip(engine.score([s.tolist() for s in seqs]), learner.compute_logprobs(seqs)))

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    syncs = []
    for _ in range(args.repeats):
        barrier()
        syncs.append(sync_weights(bridge, models, engine, bucket))
    best = min(syncs, key=lambda s: s.seconds)
    out.update(bytes=best.bytes, tensors=best.tensors, buckets=best.buckets, max_bucket_bytes=best.max_bucket_bytes,
               sync_s=[s.seconds for s in syncs], export_s=[s.extra["export_seconds"] for s in syncs])

    # memcpy baseline: the same tensors, the same bytes, copied once each into preallocated tensors
    sources = [t.clone() for _, t in bridge.export_hf_weights(models)]
    targets = [torch.empty_like(t) for t in sources]
    for dst, src in zip(targets, sources):        # touch the pages once, as the engine's tensors are resident
        dst.copy_(src)
    copies = []
    for _ in range(args.repeats):
        barrier()
        start = time.perf_counter()
        for dst, src in zip(targets, sources):
            dst.copy_(src)
        copies.append(time.perf_counter() - start)
    assert sum(t.numel() * t.element_size() for t in sources) == best.bytes
    out["memcpy_s"] = copies
    sync_s, copy_s = min(out["sync_s"]), min(copies)
    out.update(sync_bytes_per_s=best.bytes / sync_s, memcpy_bytes_per_s=best.bytes / copy_s,
               ratio=copy_s / sync_s, export_share=best.extra["export_seconds"] / best.seconds)
    gathered = [None] * launch.world_size if dist.is_initialized() else [out]
    if dist.is_initialized():
        dist.all_gather_object(gathered, out)
    engine.close()
    if launch.rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f, indent=2)
    destroy_distributed()


def launch(name: str, hf: str, repeats: int, bucket_mb: int) -> list:
    tp, pp, nproc = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        script = [os.path.abspath(__file__), "--worker", "--name", name, "--hf", hf, "--tp", str(tp), "--pp", str(pp),
                  "--repeats", str(repeats), "--bucket-mb", str(bucket_mb), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        if nproc > 1:
            torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
            cmd = [torchrun, f"--nproc-per-node={nproc}", "--master-port=29577", *script]
        else:
            cmd = [sys.executable, *script]
            env.setdefault("MASTER_PORT", "29578")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default="tp1,pp2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for key in ("name", "hf", "out"):
        ap.add_argument(f"--{key}", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from megatron_bppo.model.smollm2 import prepare_smollm2

    hf = str(prepare_smollm2())
    results = {}
    print(f"SmolLM2-135M fp32 ({hf}), bucket {args.bucket_mb} MiB, best of {args.repeats}, OMP_NUM_THREADS=1 per rank")
    print(f"{'layout':7} {'rank':>4} {'MB':>7} {'sync s':>7} {'export s':>8} {'sync MB/s':>9} {'memcpy MB/s':>11} "
          f"{'ratio':>6} {'|dlogp|':>8}")
    for name in args.layouts.split(","):
        results[name] = ranks = launch(name, hf, args.repeats, args.bucket_mb)
        for rank, r in enumerate(ranks):
            i = r["sync_s"].index(min(r["sync_s"]))
            print(f"{name:7} {rank:>4} {r['bytes'] / 1e6:7.1f} {r['sync_s'][i]:7.3f} {r['export_s'][i]:8.3f} "
                  f"{r['sync_bytes_per_s'] / 1e6:9.0f} {r['memcpy_bytes_per_s'] / 1e6:11.0f} {r['ratio']:6.2f} "
                  f"{r['logprob_maxdiff']:8.1e}")
    worst = min(r["ratio"] for ranks in results.values() for r in ranks)
    print(f"worst ratio sync/memcpy: {worst:.2f} (goal >= 0.5): {'met' if worst >= 0.5 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
