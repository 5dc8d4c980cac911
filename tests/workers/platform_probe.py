"""Exercise the megatron-core paths that need the CPU workarounds (run by tests/test_platform.py).

    python platform_probe.py HF_DIR train|ckpt|nan    (world 1; nan: a non-finite loss skips the update)
    torchrun --nproc-per-node 2 platform_probe.py HF_DIR pp

MEGATRON_BPPO_CPU_SKIP=<name> leaves one workaround out, so the probe must fail where that workaround is needed.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron_bppo.config import LearnerConfig, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402


def main(hf_dir, probe):
    from megatron_bppo.checkpointing import load_checkpoint, save_checkpoint
    from megatron_bppo.learner import build_learner

    def new_learner():          # the first call starts the process groups; a second one finds them started
        return build_learner(ModelConfig(path=hf_dir), ParallelConfig(pp=2 if probe == "pp" else 1),
                             OptimConfig(lr=1e-3), LearnerConfig(micro_batch_tokens=64, max_seq_len=64))[2]

    learner = new_learner()
    seqs = [torch.arange(3, 20), torch.arange(5, 15)]
    loss_fn = lambda lp, mb: (-(lp * mb.target_mask).sum() / 26, {})  # noqa: E731
    learner.train_step(seqs, [{}, {}], loss_fn)
    if probe == "nan":
        before = {n: p.detach().clone() for n, p in learner.unwrapped_models()[0].named_parameters()}
        metrics = learner.train_step(seqs, [{}, {}], lambda lp, mb: (loss_fn(lp, mb)[0] * float("nan"), {}))
        same = all(torch.equal(before[n], p) for n, p in learner.unwrapped_models()[0].named_parameters())
        if metrics["update_ok"] != 0.0 or not same:
            raise SystemExit(f"PROBE FAILED: NaN loss gave update_ok={metrics['update_ok']}, weights same={same}")
        learner.train_step(seqs, [{}, {}], loss_fn)          # the next finite step trains normally
    if probe == "ckpt":
        for fmt in ("fully_reshardable", "dp_reshardable"):      # both optimizer formats of checkpointing.py
            with tempfile.TemporaryDirectory() as root:
                path = save_checkpoint(root, 1, learner.models, learner.optimizer, learner.scheduler,
                                       optimizer_format=fmt)
                resumed = new_learner()
                load_checkpoint(path, resumed.models, resumed.optimizer, resumed.scheduler)
                resumed.train_step(seqs, [{}, {}], loss_fn)
                steps = {float(s["step"]) for o in resumed.optimizer.chained_optimizers
                         for s in o.optimizer.state.values()}
                if steps != {2.0}:
                    raise SystemExit(f"PROBE FAILED: Adam step after resume + 1 step is {sorted(steps)}, expected 2 "
                                     f"({fmt})")
    print("PROBE OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
