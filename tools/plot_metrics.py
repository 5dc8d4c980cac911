"""Draw PNG curves for one or several training runs (e.g. GRPO vs BPPO): the command line of
megatron_bppo.plotting.plot_runs.

    python tools/plot_metrics.py runs/grpo runs/bppo --labels GRPO BPPO --out runs/plots

Each run is a run directory (holding metrics.jsonl) or a metrics.jsonl file. The figures (below) go to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo import plotting  # noqa: E402
from megatron_bppo.plotting import plot_runs  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=plotting.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    ap.add_argument("--labels", nargs="+", help="one label per run (default: the run directory names)")
    ap.add_argument("--out", default=None, help="output directory (default: <first run>/plots)")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window for training curves")
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args(argv)
    first = Path(args.runs[0])
    out = args.out or str((first if first.is_dir() else first.parent) / "plots")
    try:
        paths = plot_runs(args.runs, args.labels, out, smooth=args.smooth, dpi=args.dpi)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
