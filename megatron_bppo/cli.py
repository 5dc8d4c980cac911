"""Command line: `megatron-bppo train --config X.yaml [section.key=value ...]`,
`megatron-bppo eval --model PATH --data SPEC --out DIR [key=value ...]` (eval_command.py), `--compare A B`.

Under torchrun / srun every rank runs the same command:
    torchrun --nproc-per-node 2 -m megatron_bppo.cli train --config examples/configs/smollm2_bppo_cpu.yaml
Exit codes: 0 done, 2 bad configuration or input (message on stderr), 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (requeue to resume).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-bppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO / BPPO training")
    train.add_argument("--config", default=None, help="YAML file (sections as in megatron_bppo/config.py)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 algorithm.name=grpo")
    check = sub.add_parser("check-config", help="load and validate a config, print it, exit")
    check.add_argument("--config", default=None)
    check.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="evaluate an HF directory or a Megatron checkpoint on a dataset, or compare "
                        "two evaluations (--compare A B)")
    ev.add_argument("--model", help="HF directory, or a Megatron checkpoint: an iter_* directory, a checkpoint root "
                    "or a run directory (its latest complete checkpoint)")
    ev.add_argument("--data", help="what data.eval accepts: a jsonl / parquet file, or arithmetic:<preset> (its "
                    "held-out split, as training evaluates it)")
    ev.add_argument("--out", help="directory for summary.json and problems.jsonl")
    ev.add_argument("--samples", type=int, default=0, help="k samples per problem at sampling.temperature "
                    "(mean@k, pass@j); 0: greedy only")
    ev.add_argument("--seed", type=int, default=None, help="sampling seed (default sampling.seed; the samples "
                    "use seeds.eval_seed(seed), as the trainer's evaluation)")
    ev.add_argument("--limit", type=int, default=None, help="first N problems (default: a file's every row, a "
                    "generated task's data.eval_size)")
    ev.add_argument("--config", default=None, help="YAML config (default: the run's saved config when --model "
                    "is a run's checkpoint, else the defaults)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing summary.json / problems.jsonl")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two --out directories: A - B with paired "
                    "bootstrap intervals")
    ev.add_argument("--resamples", type=int, default=10000, help="--compare: bootstrap resamples")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.max_tokens=512 rollout.backend=hf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")      # vLLM logs every sleep / wake / reload at INFO

    from .config import ConfigError, load_config

    try:
        if args.command == "eval":
            return evaluate_command(ev, args)
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            import json
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return 0
        from .lifetime import bind_to_launcher
        from .platform.stack import check_stack
        from .trainer import train as run_training

        bind_to_launcher()              # a rank under torchrun / srun dies with its launcher, from the start
        check_stack(cfg)                # installed vs pinned versions: a warning per mismatch (platform/stack.py)

        return run_training(cfg)
    except ConfigError as e:
        from .distributed import launch_rank

        if launch_rank() == 0:
            print(f"megatron-bppo: configuration error: {e}", file=sys.stderr, flush=True)
        return 2


def evaluate_command(parser, args) -> int:
    from .eval_command import run_compare, run_eval

    if args.compare:
        return run_compare(*args.compare, resamples=args.resamples)
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        parser.error(f"eval needs {', '.join(missing)} (or --compare A B)")
    from .lifetime import bind_to_launcher

    bind_to_launcher()
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
