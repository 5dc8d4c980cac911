"""`megatron-bppo eval`: evaluate a model on a dataset, or compare two evaluations with a paired interval.

    megatron-bppo eval --model PATH --data SPEC --out DIR [--samples K] [--seed S] [--limit N] [key=value ...]
    megatron-bppo eval --compare A B [--resamples 10000]

    PATH --(resolve_model)--> an HF directory: the engine loads its weights
                              a Megatron checkpoint (an iter_* directory, or a checkpoint root / run directory:
                              its latest complete one): model.bridge builds the model at this launch's layout (any
                              saved TP/PP loads), checkpointing.load_checkpoint (weights only), then
                              weight_sync.sync_weights into an engine started without weights -- the trainer's
                              path; no HF copy is written
    config: the run's saved config.json when PATH belongs to a run (its prompt rendering: instruction, chat template,
            budgets, reward), else the defaults or --config; then data.eval=SPEC and the key=value overrides
    SPEC --(data.prompts.held_out_prompts: rendered as training renders them)--> prompts
    engine + prompts --(evaluation.evaluate_problems: greedy, then K samples; verdicts scored once, shared)
        --> DIR/problems.jsonl (per problem: id, prompt, reference, responses, verdicts, lengths)
            DIR/summary.json (evaluation.summarize's figures, the settings, the model and data identity)
    A, B --(same problems and settings, else refused naming the difference; evaluation.paired_compare)
        --> A - B per figure with a 95 % paired-bootstrap interval, problems each gets right alone

Under torchrun / srun every rank runs the same command (one engine replica per rank, prompts split over them, as
in training); rank 0 writes. Exit codes as `train`: 0 done, 2 bad input (message on stderr, nothing written).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

from .errors import ConfigError

SUMMARY, PROBLEMS = "summary.json", "problems.jsonl"
# settings two evaluations must share to be compared (summary.json "settings" keys)
COMPARED_SETTINGS = ("samples", "seed", "temperature", "top_p", "max_tokens", "reward", "reward_kwargs")


@dataclass
class ModelSource:
    kind: str                       # "hf" | "megatron"
    hf_dir: str                     # config + tokenizer (and, for "hf", the weights)
    checkpoint: Optional[str]       # the iter_* directory ("megatron")
    run_config: Optional[str]       # the run's saved config.json, when the checkpoint belongs to a run


def resolve_model(path: str) -> ModelSource:
    """PATH -> what to load (ConfigError naming what is wrong otherwise). A checkpoint root or run directory
    resolves to its latest complete checkpoint; an incomplete one is refused with the reason."""
    from .checkpointing import incomplete_reason, latest_checkpoint, scan_checkpoints

    if not os.path.isdir(path):
        raise ConfigError(f"--model {path!r} is not a directory: give an HF model directory or a Megatron "
                          "checkpoint (an iter_* directory, a checkpoint root or a run directory)")
    path = os.path.abspath(path)
    if os.path.basename(path).startswith("iter_"):
        why = incomplete_reason(path)
        if why:
            raise ConfigError(f"--model {path!r} is an incomplete checkpoint ({why}): give a complete one, or its "
                              "checkpoint root to use the latest complete one")
        return _megatron_source(path)
    for root in (path, os.path.join(path, "checkpoints")):
        complete, incomplete = scan_checkpoints(root)
        if complete or incomplete:
            latest = latest_checkpoint(root)
            if latest is None:
                raise ConfigError(f"--model {path!r}: no complete checkpoint under {root} (incomplete: "
                                  + "; ".join(f"{n}: {w}" for n, w in incomplete) + ")")
            return _megatron_source(latest)
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource("hf", path, None, None)
    raise ConfigError(f"--model {path!r} is neither an HF model directory (no config.json) nor a Megatron "
                      "checkpoint (no iter_* directory)")


def _megatron_source(ckpt: str) -> ModelSource:
    hf_dir = os.path.join(ckpt, "hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"--model: checkpoint {ckpt} has no hf/config.json (saved without the HF source's "
                          "config and tokenizer): evaluate an HF export instead (tools/convert_checkpoint.py "
                          "mcore-to-hf)")
    root = os.path.dirname(ckpt)
    for candidate in (os.path.join(os.path.dirname(root), "config.json"), os.path.join(root, "config.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                saved = json.load(f)
            ckpt_dir = (saved.get("checkpoint") or {}).get("dir") if isinstance(saved, dict) else None
            if ckpt_dir and os.path.realpath(ckpt_dir) == os.path.realpath(root):
                return ModelSource("megatron", hf_dir, ckpt, candidate)
    return ModelSource("megatron", hf_dir, ckpt, None)


def eval_config(source: ModelSource, data: str, config: Optional[str], overrides: list[str]):
    """The run's saved config (or --config, or the defaults) + model.path, data.eval=SPEC, the overrides."""
    from .config import load_config

    # the saved config.json is JSON, which YAML reads as it is
    return load_config(config or source.run_config, [f"model.path={source.hf_dir}", f"data.eval={data}", *overrides])


def check_output(out: str, overwrite: bool):
    for name in (SUMMARY, PROBLEMS):
        if os.path.exists(os.path.join(out, name)) and not overwrite:
            raise ConfigError(f"--out {out!r} already holds {name}: choose another directory or pass --overwrite")


def run_eval(args) -> int:
    from transformers import AutoTokenizer

    from .data import held_out_prompts, prompts_fingerprint
    from .distributed import print_rank0
    from .evaluation import evaluate_problems, summarize
    from .rewards import reward_from_config
    from .seeds import eval_seed

    started = time.time()
    source = resolve_model(args.model)
    check_output(args.out, args.overwrite)
    cfg = eval_config(source, args.data, args.config, args.overrides)
    reward_fn = reward_from_config(cfg.reward)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir, trust_remote_code=cfg.model.trust_remote_code)
    generated = args.data.startswith("arithmetic")
    limit = args.limit or (cfg.data.eval_size if generated else None)
    prompts = held_out_prompts(cfg, tokenizer, args.data, limit)
    seed = args.seed if args.seed is not None else cfg.sampling.seed
    engine, step = open_model_engine(source, cfg)
    print_rank0(f"[eval] {source.kind} model {source.checkpoint or source.hf_dir}: {len(prompts)} problems of "
                f"{args.data}, greedy + {args.samples} samples at T={cfg.sampling.temperature}, max "
                f"{cfg.sampling.max_tokens} tokens, rollout.backend={cfg.rollout.backend}")
    phases = {}

    def progress(phase, tokens, seconds):
        phases[phase] = {"seconds": seconds, "tokens": tokens}
        print_rank0(f"[eval] {phase}: {tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.0f} tokens/s)")

    try:
        problems = evaluate_problems(engine, prompts, cfg.sampling, reward_fn, cfg.reward.kwargs, args.samples,
                                     eval_seed(seed), progress)
    finally:
        engine.close()
    figures = summarize(problems)
    summary = {"figures": figures, "phases": phases, "wall_s": time.time() - started,
               "model": {"kind": source.kind, "path": os.path.abspath(args.model), "hf_dir": source.hf_dir,
                         "checkpoint": source.checkpoint, "step": step, "run_config": source.run_config},
               "data": {"spec": args.data, "problems": len(prompts), "limit": limit,
                        "fingerprint": prompts_fingerprint(prompts), "instruction": cfg.data.instruction,
                        "instruction_position": cfg.data.instruction_position, "seed": cfg.data.seed},
               "settings": {"samples": args.samples, "seed": seed, "temperature": cfg.sampling.temperature,
                            "top_p": cfg.sampling.top_p, "max_tokens": cfg.sampling.max_tokens,
                            "reward": cfg.reward.name, "reward_kwargs": cfg.reward.kwargs,
                            "backend": cfg.rollout.backend, "dtype": cfg.model.dtype},
               "command": sys.argv}
    from .distributed import is_rank0

    if is_rank0():
        write_outputs(args.out, summary, problems)
        line = f"[eval] pass@1 {figures['pass@1']:.3f}"
        if args.samples:
            line += f"  mean@{args.samples} {figures[f'mean@{args.samples}']:.3f}"
        print(line + f"  length mean {figures['greedy_length']['mean']:.1f}  truncated "
              f"{figures['greedy_length']['truncated']:.1%}; wrote {args.out}/{SUMMARY}, {PROBLEMS}", flush=True)
    return 0


def open_model_engine(source: ModelSource, cfg):
    """The engine on every rank with the model's weights (process groups started when the launch has several
    ranks); the checkpoint's step (None for an HF directory)."""
    from .rollout import open_engine

    if source.kind == "hf":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from .distributed import init_distributed

            init_distributed(cfg.parallel)
        return open_engine(cfg.rollout, source.hf_dir, dtype=cfg.model.dtype,
                           trust_remote_code=cfg.model.trust_remote_code), None
    from .checkpointing import load_checkpoint
    from .model.bridge import open_model
    from .weight_sync import sync_weights

    _, bridge = open_model(cfg.model, cfg.parallel, require_weights=False)
    models = bridge.build(load_weights=False)
    state = load_checkpoint(source.checkpoint, models, load_rng=False)
    engine = open_engine(replace(cfg.rollout, load_format="dummy"), source.hf_dir, dtype=cfg.model.dtype,
                         trust_remote_code=cfg.model.trust_remote_code)
    sync_weights(bridge, models, engine, cfg.rollout.bucket_bytes)
    del models
    return engine, state["step"]


def write_outputs(out: str, summary: dict, problems: list[dict]):
    """problems.jsonl then summary.json, each written to a temporary name and renamed (a summary means the
    problems file beside it is complete)."""
    os.makedirs(out, exist_ok=True)
    for name, text in ((PROBLEMS, "".join(json.dumps(p) + "\n" for p in problems)),
                       (SUMMARY, json.dumps(summary, indent=2, default=str))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


# ------------------------------------------------------------------------------------------ compare
def read_evaluation(path: str) -> tuple[dict, list[dict]]:
    for name in (SUMMARY, PROBLEMS):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(f"--compare: {path!r} has no {name} (not a finished `megatron-bppo eval --out` "
                              "directory)")
    with open(os.path.join(path, SUMMARY)) as f:
        summary = json.load(f)
    with open(os.path.join(path, PROBLEMS)) as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return summary, problems


def comparable(a: dict, b: dict) -> list[str]:
    """The differences that forbid comparing two summaries: the problem set and the settings."""
    diffs = []
    for key in ("spec", "fingerprint", "problems"):
        if a["data"].get(key) != b["data"].get(key):
            diffs.append(f"data.{key}: {a['data'].get(key)!r} vs {b['data'].get(key)!r}")
    for key in COMPARED_SETTINGS:
        if a["settings"].get(key) != b["settings"].get(key):
            diffs.append(f"settings.{key}: {a['settings'].get(key)!r} vs {b['settings'].get(key)!r}")
    return diffs


def run_compare(a_dir: str, b_dir: str, resamples: int, seed: int = 0) -> int:
    from .evaluation import paired_compare

    (sa, pa), (sb, pb) = read_evaluation(a_dir), read_evaluation(b_dir)
    diffs = comparable(sa, sb)
    if diffs:
        raise ConfigError(f"--compare: {a_dir} and {b_dir} were not evaluated on the same problems with the same "
                          "settings: " + "; ".join(diffs))
    result = paired_compare(pa, pb, resamples=resamples, seed=seed)
    print(f"A = {a_dir} ({sa['model']['path']})\nB = {b_dir} ({sb['model']['path']})\n"
          f"{result['problems']} problems of {sa['data']['spec']}; paired bootstrap over problems, "
          f"{resamples} resamples, 95 % percentile intervals")
    print(f"  {'figure':16s} {'A':>9s} {'B':>9s} {'A - B':>9s}   95 % interval")
    for name, f in result["figures"].items():
        print(f"  {name:16s} {f['a']:9.3f} {f['b']:9.3f} {f['diff']:+9.3f}   [{f['ci95'][0]:+.3f}, "
              f"{f['ci95'][1]:+.3f}]")
    print(f"  greedy: right only in A {result['only_a_correct']}, only in B {result['only_b_correct']}")
    print(json.dumps(result))
    return 0
