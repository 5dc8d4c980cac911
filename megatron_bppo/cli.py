"""Command line: `megatron-bppo train --config X.yaml [section.key=value ...]`.

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")      # vLLM logs every sleep / wake / reload at INFO

    from .config import ConfigError, load_config

    try:
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


if __name__ == "__main__":
    sys.exit(main())
