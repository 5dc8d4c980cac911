"""Turn the public MATH release into this project's prompt jsonl (and, optionally, verl's parquet).

    python examples/prepare_math.py MATH/ --out-dir data/math [--parquet] [--levels 3 4 5] [--types Algebra]
    python examples/prepare_math.py math500/test.jsonl --out-dir data/math500

Inputs: the release's directory tree ``MATH/{train,test}/<subject>/<n>.json`` (each file one problem: problem,
level, type, solution with the answer in ``\\boxed{}``); or jsonl / parquet variants with the columns problem,
solution and/or answer (MATH-500 style: answer, subject, level, unique_id). A tree with ``train/`` and ``test/``
gives one split each; any other input gives one split named after it (``--split`` overrides).

The reference answer is the ``answer`` column when present, else the last ``\\boxed{...}`` of the solution
(nested braces matched). Outputs per split in --out-dir: ``<split>.jsonl`` (``{"id": "math-<split>-<path or id>",
"data_source": "math", "prompt", "answer", "meta": {"split", "level", "type", "solution"}}``) and with --parquet
``<split>.parquet`` in verl's schema (question followed by --instruction). Malformed problems (invalid JSON, no
boxed answer, empty problem) are skipped, counted and reported; exit code 2 when an input cannot be used.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo.data import BOXED_INSTRUCTION, DatasetError, PromptDataset, read_prompt_file  # noqa: E402
from megatron_bppo.data.datasets import write_prompts_jsonl, write_verl_parquet  # noqa: E402


def level_number(level) -> Optional[int]:
    """``"Level 5"`` / ``5`` -> 5; ``"Level ?"`` -> None."""
    if isinstance(level, int):
        return level
    m = re.search(r"\d+", str(level or ""))
    return int(m.group(0)) if m else None


def find_splits(inputs: list[str], split: Optional[str]) -> list[tuple[str, Path]]:
    out = []
    for p in map(Path, inputs):
        subdirs = [p / s for s in ("train", "test") if (p / s).is_dir()] if p.is_dir() else []
        if subdirs and not split:
            out.extend((d.name, d) for d in subdirs)
        else:
            out.append((split or p.name.split(".")[0], p))
    return out


def prepare(inputs: list[str], out_dir: str, *, parquet: bool = False, split: Optional[str] = None,
            levels: Optional[list[int]] = None, types: Optional[list[str]] = None,
            instruction: str = BOXED_INSTRUCTION) -> dict:
    """Convert every input; returns {split: PromptDataset} (after the level/type filters)."""
    result = {}
    for name, path in find_splits(inputs, split):
        ds = read_prompt_file(path, schema="math", data_source="math", id_prefix="")
        kept = []
        for ex in ds:
            ex.id = f"math-{name}-{ex.id}"
            ex.meta["split"] = name
            lv = level_number(ex.meta.get("level"))
            subject = ex.meta.get("type") or ex.meta.get("subject")
            if levels and lv not in levels:
                continue
            if types and subject not in types:
                continue
            kept.append(ex)
        if not kept:
            print(f"{path}: no problems left after the level/type filters; no {name}.jsonl written")
            continue
        out = PromptDataset(kept, ds.report)
        write_prompts_jsonl(out, Path(out_dir) / f"{name}.jsonl")
        if parquet:
            write_verl_parquet(out, Path(out_dir) / f"{name}.parquet", instruction=instruction, split=name)
        filtered = len(ds) - len(kept)
        print(ds.report.summary() + (f"; {filtered} filtered out by level/type" if filtered else ""))
        result[name] = out
    if not result:
        raise DatasetError("no problems left after the level/type filters in any input")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="the MATH directory tree, or .jsonl/.json/.parquet files")
    ap.add_argument("--out-dir", default="data/math")
    ap.add_argument("--parquet", action="store_true", help="also write verl-schema parquet files")
    ap.add_argument("--split", default=None, help="split name for the input (default: from the path)")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="keep only these levels (1-5)")
    ap.add_argument("--types", nargs="+", default=None, help="keep only these subjects, e.g. Algebra Geometry")
    ap.add_argument("--instruction", default=BOXED_INSTRUCTION, help="appended to the problem in the parquet")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the per-file summary below already reports skipped rows
    try:
        prepare(args.inputs, args.out_dir, parquet=args.parquet, split=args.split, levels=args.levels,
                types=args.types, instruction=args.instruction)
    except DatasetError as e:
        print(f"prepare_math: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
