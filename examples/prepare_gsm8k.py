"""Turn the public GSM8K release into this project's prompt jsonl (and, optionally, verl's parquet).

    python examples/prepare_gsm8k.py grade_school_math/data/train.jsonl grade_school_math/data/test.jsonl \
        --out-dir data/gsm8k [--parquet]

Inputs: GSM8K's jsonl files (one {"question", "answer"} object per line, the answer a worked solution ending in
``#### <number>``), or the same columns as .parquet (the hub's ``main/train-00000-of-00001.parquet``). A directory
is searched for ``train*.jsonl|parquet`` and ``test*.jsonl|parquet`` (``*socratic*`` files are left out).
The split is ``train`` / ``test`` when the file name says so, else the file stem (``--split`` overrides it).

Outputs in --out-dir, per split: ``<split>.jsonl`` with rows ``{"id": "gsm8k-<split>-<row>", "data_source":
"gsm8k", "prompt": question, "answer": "72", "meta": {"split", "solution"}}`` (the answer has its thousands
commas removed: ``1,350`` -> ``1350``), and with --parquet ``<split>.parquet`` in verl's schema (prompt = one user
message: the question followed by --instruction). Malformed rows (invalid JSON, no ``####``, empty question) are
skipped, counted and reported; the exit code is 2 when an input cannot be used at all.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo.data import GSM8K_INSTRUCTION, DatasetError, read_prompt_file  # noqa: E402
from megatron_bppo.data.datasets import write_prompts_jsonl, write_verl_parquet  # noqa: E402


def find_inputs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".parquet") and "socratic" not in q.name
                           and (q.name.startswith("train") or q.name.startswith("test")))
            if not found:
                raise DatasetError(f"{str(p)!r} holds no train*/test* .jsonl or .parquet files")
            out.extend(found)
        else:
            out.append(p)
    return out


def split_name(path: Path) -> str:
    name = path.name.lower()
    return "train" if "train" in name else "test" if "test" in name else path.name.split(".")[0]


def prepare(inputs: list[str], out_dir: str, *, parquet: bool = False, split: str | None = None,
            instruction: str = GSM8K_INSTRUCTION, limit: int | None = None) -> dict:
    """Convert every input; returns {split: LoadReport}."""
    files = find_inputs(inputs)
    if split and len(files) > 1:
        raise DatasetError("--split names one split; give one input file with it")
    reports = {}
    for f in files:
        name = split or split_name(f)
        ds = read_prompt_file(f, schema="gsm8k", data_source="gsm8k", id_prefix=f"gsm8k-{name}-", limit=limit)
        for ex in ds:
            ex.meta["split"] = name
        write_prompts_jsonl(ds, Path(out_dir) / f"{name}.jsonl")
        if parquet:
            write_verl_parquet(ds, Path(out_dir) / f"{name}.parquet", instruction=instruction, split=name)
        reports[name] = ds.report
        print(ds.report.summary())
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="GSM8K .jsonl/.parquet files or a directory holding them")
    ap.add_argument("--out-dir", default="data/gsm8k")
    ap.add_argument("--parquet", action="store_true", help="also write verl-schema parquet files")
    ap.add_argument("--split", default=None, help="split name for a single input (default: from the file name)")
    ap.add_argument("--instruction", default=GSM8K_INSTRUCTION, help="appended to the question in the parquet")
    ap.add_argument("--limit", type=int, default=None, help="keep at most this many rows per split")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the per-file summary below already reports skipped rows
    try:
        prepare(args.inputs, args.out_dir, parquet=args.parquet, split=args.split, instruction=args.instruction,
                limit=args.limit)
    except DatasetError as e:
        print(f"prepare_gsm8k: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
