"""Peak memory of a whole command and its process tree (e.g. `make demo`: torchrun, two ranks, their engines).

    python bench/peak_memory.py [--interval 0.5] [--json OUT] -- COMMAND ...

Protocol: runs COMMAND, and every --interval seconds sums the resident memory of the command's whole process tree
(psutil: the process and all its descendants at that moment); reports the peak of that sum (what the machine
must hold at once), each process's own peak RSS, the samples taken and the command's exit code and wall time.
RSS counts pages shared between processes (the torch / vLLM libraries mapped by both ranks) once per process,
so the sum overstates the machine's need by the shared pages; the PSS sum (proportional set size, shared pages
split between their users) is sampled too, every --pss-every samples (it is slower to read). Sampling can miss a
peak shorter than the interval. Exits with the command's exit code.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def tree(proc):
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(procs, pss: bool):
    """(sum of RSS, sum of PSS or None, {pid: (name, rss)}) over the live processes of `procs`, bytes."""
    import psutil

    total, total_pss, each = 0, 0 if pss else None, {}
    for p in procs:
        try:
            if pss:
                info = p.memory_full_info()
                rss, total_pss = info.rss, total_pss + info.pss
            else:
                rss = p.memory_info().rss
            each[p.pid] = (" ".join(p.cmdline()[:4])[:120] or p.name(), rss)
            total += rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total, total_pss, each


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--pss-every", type=int, default=10, help="read PSS every N-th sample (0: never)")
    ap.add_argument("--json", default="")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    import psutil

    started = time.time()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak = {"rss_sum": 0, "rss_sum_at_s": 0.0, "pss_sum": 0, "pss_sum_at_s": 0.0}
    per_process, samples = {}, 0
    while child.poll() is None:
        pss = args.pss_every > 0 and samples % args.pss_every == 0
        total, total_pss, each = sample(tree(root), pss)
        samples += 1
        now = time.time() - started
        if total > peak["rss_sum"]:
            peak.update(rss_sum=total, rss_sum_at_s=now)
        if total_pss is not None and total_pss > peak["pss_sum"]:
            peak.update(pss_sum=total_pss, pss_sum_at_s=now)
        for pid, (name, rss) in each.items():
            if rss > per_process.get(pid, ("", 0))[1]:
                per_process[pid] = (name, rss)
        time.sleep(args.interval)
    result = {"command": command, "exit_code": child.returncode, "wall_s": time.time() - started,
              "samples": samples, "interval_s": args.interval,
              "peak_rss_sum_gib": peak["rss_sum"] / 2**30, "peak_rss_sum_at_s": peak["rss_sum_at_s"],
              "peak_pss_sum_gib": peak["pss_sum"] / 2**30, "peak_pss_sum_at_s": peak["pss_sum_at_s"],
              "per_process_peak_rss_gib": sorted(((n, r / 2**30) for n, r in per_process.values()),
                                                 key=lambda x: -x[1])[:8]}
    print(f"[peak_memory] exit {child.returncode} after {result['wall_s']:.0f}s, {samples} samples every "
          f"{args.interval}s: peak RSS of the process tree {result['peak_rss_sum_gib']:.2f} GiB (at "
          f"{peak['rss_sum_at_s']:.0f}s), peak PSS {result['peak_pss_sum_gib']:.2f} GiB; largest processes: "
          + ", ".join(f"{n.split()[-1] if n else '?'} {r:.2f}" for n, r in result["per_process_peak_rss_gib"][:4]),
          flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
