"""Gradient-similarity analysis (BPPO paper): do same-class completions of a group push the policy the same way?

    prompts --(HF sampler, G completions each, rank 0, broadcast)--> completions --(answer reward)--> classes
    each completion --(Megatron learner: grad of its mean response log-prob, selected params, any TP/PP)--> g_i
    {g_i} --(Gram matrix summed over TP shards and PP stages)--> cosine matrix per group
      --> mean same-class (correct/correct, wrong/wrong) vs cross-class cosine, PNG heatmaps, summary table

g_i is the score-function gradient of completion i, d/dθ (1/|y_i|) Σ_t log π(y_i,t | x, y_i,<t). Its
contribution to a GRPO/BPPO update is A_i·g_i, so the cosine of two update directions is sign(A_i A_j) times
the cosine reported here (same class: same sign; cross class: flipped).

    python tools/grad_similarity.py --out runs/gradsim                      # SmolLM2-135M-Instruct, 1 process
    torchrun --nproc-per-node 2 tools/grad_similarity.py --model H --tp 2 --out D
`--reward random:SEED` labels completions by a coin flip: a control in which classes carry no signal, so
same- and cross-class similarities should agree.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

INSTRUCTION = "Solve the problem. Put the final answer after '####'."


def make_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]
    return [(f"What is {a} + {b}?", a + b) for a, b in pairs]


def extract_answer(text: str):
    match = re.search(r"####\s*(-?[\d,]+)", text)
    numbers = [match.group(1)] if match else re.findall(r"-?\d[\d,]*", text)
    return int(numbers[-1 if not match else 0].replace(",", "")) if numbers else None


def label(text: str, answer: int, reward: str, rng: random.Random) -> bool:
    if reward == "answer":
        return extract_answer(text) == answer
    return rng.random() < 0.5


def sample(model_dir: str, prompts, group_size: int, max_new_tokens: int, temperature: float, seed: int):
    """Rank 0 only: [(prompt_ids, [response_ids] * G, [text] * G)] with transformers sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = []
    for question, _ in prompts:
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, do_sample=True, temperature=temperature, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=group_size,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        responses = []
        for row in gen[:, ids.shape[1]:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            responses.append(row or [tok.eos_token_id])
        out.append((ids[0].tolist(), responses, [tok.decode(r, skip_special_tokens=True) for r in responses]))
    return out


def gram_matrix(learner, sequences, prompt_lengths, select) -> torch.Tensor:
    """Gram matrix of per-completion score gradients, summed over TP shards and PP stages."""
    from megatron.core import parallel_state as ps

    flats = []
    for seq, prompt_len in zip(sequences, prompt_lengths):
        response = torch.zeros(len(seq) - 1)
        response[prompt_len - 1:] = 1.0 / (len(seq) - prompt_len)
        grads = learner.local_gradients([seq], [{"w": response}],
                                        lambda lp, mb: (-(lp * mb.fields["w"]).sum(), {}), select)
        params = dict(learner.unwrapped_models()[0].named_parameters())
        keep = [g.flatten() for name, g in sorted(grads.items())
                if getattr(params[name], "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0]
        flats.append(torch.cat(keep) if keep else torch.zeros(0, device=learner.device))
    stacked = torch.stack(flats).double()
    gram = stacked @ stacked.T
    if dist.is_initialized():
        dist.all_reduce(gram, group=ps.get_model_parallel_group())
    return gram.cpu()


def summarize(groups: list[dict]) -> dict:
    """Mean pairwise cosine by class relation. `score` = raw score gradients g_i; `update` = the directions a
    GRPO/BPPO step applies, A_i g_i, whose cosine flips sign across classes (A+ > 0 > A-)."""
    pairs = {"correct_correct": [], "wrong_wrong": [], "cross_class": []}
    for g in groups:
        cos, lab = g["cosine"], g["correct"]
        for i in range(len(lab)):
            for j in range(i + 1, len(lab)):
                key = "cross_class" if lab[i] != lab[j] else "correct_correct" if lab[i] else "wrong_wrong"
                pairs[key].append(cos[i][j])
    pairs["same_class"] = pairs["correct_correct"] + pairs["wrong_wrong"]

    def stats(xs, sign=1.0):
        t = torch.tensor(xs, dtype=torch.float64) * sign if xs else torch.tensor([float("nan")])
        return {"mean": t.mean().item(), "std": t.std().item() if len(xs) > 1 else 0.0, "pairs": len(xs)}

    out = {key: stats(xs) for key, xs in pairs.items()}
    out["update_direction"] = {"same_class": stats(pairs["same_class"]),
                               "cross_class": stats(pairs["cross_class"], -1.0)}
    out["mixed_groups"] = sum(1 for g in groups if 0 < sum(g["correct"]) < len(g["correct"]))
    out["groups"] = len(groups)
    return out


def draw(groups, summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        order = sorted(range(len(g["correct"])), key=lambda i: (not g["correct"][i], i))
        cos = torch.tensor(g["cosine"])[order][:, order]
        im = ax.imshow(cos.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ticks = ["C" if g["correct"][i] else "W" for i in order]
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(g["question"][:28], fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.04)
    fig.suptitle(f"cosine of per-completion gradients: same-class {summary['same_class']['mean']:.3f}, "
                 f"cross-class {summary['cross_class']['mean']:.3f}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary) -> str:
    lines = ["| pairs | count | score-gradient cosine (mean +- std) | update-direction cosine A_i g_i |",
             "|---|---|---|---|"]
    for key in ("same_class", "correct_correct", "wrong_wrong", "cross_class"):
        s = summary[key]
        sign = -1 if key == "cross_class" else 1
        lines.append(f"| {key} | {s['pairs']} | {s['mean']:+.4f} +- {s['std']:.4f} | {sign * s['mean']:+.4f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF checkpoint dir (default: SmolLM2-135M-Instruct, prepared)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--params", default="last-layer",
                    help="regex over Megatron parameter names, or 'last-layer' (every weight of the last layer)")
    ap.add_argument("--reward", default="answer", help="answer | random:SEED (control)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args(argv)

    from megatron_bppo.config import LearnerConfig, OptimConfig, ParallelConfig
    from megatron_bppo.distributed import init_distributed, print_rank0
    from megatron_bppo.learner import Learner
    from megatron_bppo.model.bridge import HFBridge, model_dims, read_hf_config

    if args.reward != "answer" and not args.reward.startswith("random:"):
        raise SystemExit(f"--reward {args.reward!r}: use 'answer' or 'random:SEED'")
    if not args.model:
        from megatron_bppo.testing.smollm2 import prepare_smollm2
        args.model = str(prepare_smollm2())
    hf_config = read_hf_config(args.model)
    launch, _ = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), model_dims(hf_config), seed=args.seed)
    start = time.time()
    prompts = make_prompts(args.prompts, args.seed)
    payload = [sample(args.model, prompts, args.group_size, args.max_new_tokens, args.temperature, args.seed)
               if launch.rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(payload, src=0)
    samples = payload[0]
    print_rank0(f"[gradsim] sampled {args.prompts}x{args.group_size} completions in {time.time() - start:.1f}s")

    bridge = HFBridge(args.model)
    learner = Learner(bridge.build(), OptimConfig(lr=1e-6, use_distributed_optimizer=False),
                      LearnerConfig(micro_batch_tokens=4096, max_seq_len=4096))
    last = hf_config.num_hidden_layers - 1
    pattern = re.compile(rf"decoder\.layers\.{last}\." if args.params == "last-layer" else args.params)
    from megatron.core import parallel_state as ps
    offset = ps.get_pipeline_model_parallel_rank() * (hf_config.num_hidden_layers // args.pp)

    def select(name):      # Megatron names are stage-local: map the layer index back to the global one
        global_name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        return bool(pattern.search(global_name))

    coin = random.Random(int(args.reward.split(":")[1]) if ":" in args.reward else 0)
    groups = []
    for (question, answer), (prompt_ids, responses, texts) in zip(prompts, samples):
        seqs = [torch.tensor(prompt_ids + r) for r in responses]
        gram = gram_matrix(learner, seqs, [len(prompt_ids)] * len(seqs), select)
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        cos = gram / norms[:, None] / norms[None, :]
        groups.append({"question": question, "answer": answer, "texts": texts, "prompt_ids": prompt_ids,
                       "responses": responses,
                       "correct": [label(t, answer, args.reward, coin) for t in texts],
                       "lengths": [len(r) for r in responses], "cosine": cos.tolist(),
                       "grad_norms": norms.tolist()})
        print_rank0(f"[gradsim] {question}: {sum(groups[-1]['correct'])}/{len(texts)} correct "
                    f"({time.time() - start:.0f}s)")
    summary = summarize(groups)
    summary.update(model=args.model, params=args.params, reward=args.reward, tp=args.tp, pp=args.pp,
                   seconds=time.time() - start)
    if launch.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gradsim.json"), "w") as f:
            json.dump({"summary": summary, "groups": groups}, f, indent=1)
        draw(groups, summary, os.path.join(args.out, "gradsim.png"))
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table(summary) + "\n")
        print(table(summary))
        print(f"[gradsim] wrote {args.out}/gradsim.json, gradsim.png, summary.md")


if __name__ == "__main__":
    main()
