"""Early stop replayed on a run without it: the trained pair's advantages as the run set them, and as each
algorithm.early_stop policy would have set them on the same samples.

    python bench/early_stop_replay.py RUN_DIR [--json OUT]

Input: a BPPO run trained with train.dump_batches=true and algorithm.early_stop=off (its batches/step_*.pt and
config.json). In each mixed group, the samples early stop would have stopped are the ones that were still running
when both classes had a finished sample, and longer than max(shortest correct, shortest incorrect)
(selection.unselectable_running, given the samples' final lengths). For a group that was not extended, any sample
can be one of them. For an extended group only the extra samples can: its first n_init were all finished and
single-class when the extra ones started. The rule ignores that samples start at different times; on a stop arm's
run of the same seed, the step whose weights are still identical gives the real count (rollout/samples_stopped)
to compare with.

The stopped samples then take the group's lowest incorrect reward and count as wrong (as_incorrect), or they leave
the group (exclude). Advantages come from the trainer's functions with the run's settings (group_advantages,
select_binary, weight_selected_advantages). The pair is the same under every policy; the script checks this.

Printed per step: mixed groups, the samples stopped out of the samples, the trained pair's mean A+ and A- under
off / as_incorrect / exclude, the pair's mean lengths, and the groups' mean share of correct samples (p) under each
policy. Then the means over the run: A+, A-, and A+ + A-, the pair's net push on its common prefix features.
"""
import argparse
import glob
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo.algorithms import (group_advantages, select_binary, unselectable_running,  # noqa: E402
                                      weight_selected_advantages)

POLICIES = ("off", "as_incorrect", "exclude")


def replay_group(group: dict, algo: dict):
    """One dumped group -> None (not mixed) or {policy: (A+, A-, p)}, (L+, L-), samples stopped, samples."""
    correct, rewards = list(group["correct"]), [float(r) for r in group["rewards"]]
    lengths = [len(c) for c in group["completions"]]
    n = len(correct)
    if not 0 < sum(correct) < n:
        return None
    eligible = range(algo["n_init"] if n > algo["n_init"] else 0, n)
    stopped = set(unselectable_running(list(zip(lengths, correct)), {i: lengths[i] for i in eligible}))
    floor = min(r for r, ok in zip(rewards, correct) if not ok)
    variants = {"off": (rewards, correct, [True] * n),
                "as_incorrect": ([floor if i in stopped else r for i, r in enumerate(rewards)],
                                 [ok and i not in stopped for i, ok in enumerate(correct)], [True] * n),
                "exclude": (rewards, correct, [i not in stopped for i in range(n)])}
    out, pair, length = {}, None, torch.tensor([lengths])
    for policy, (r, c, v) in variants.items():
        r, c, v = torch.tensor([r], dtype=torch.float64), torch.tensor([c]), torch.tensor([v])
        adv = group_advantages(r, mode=algo["advantage"], eps=algo["adv_eps"], valid=v)
        mask = select_binary(c, length, adv, v).mask
        weights = weight_selected_advantages(adv, c, mask, v, algo["pair_weighting"])[0]
        chosen = mask[0].nonzero().flatten().tolist()
        if pair is not None and chosen != pair:
            raise AssertionError(f"policy {policy} changed the trained pair {pair} -> {chosen}: a stopped sample "
                                 "was selectable")
        pair = chosen
        plus, minus = (next(i for i in chosen if correct[i] == want) for want in (True, False))
        out[policy] = (float(weights[plus]), float(weights[minus]), float(r[0][v[0]].mean()))
    return out, (lengths[plus], lengths[minus]), len(stopped), n


def replay(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    algo = cfg["algorithm"]
    if algo.get("early_stop", "off") != "off":
        raise SystemExit(f"{run_dir} ran with algorithm.early_stop={algo['early_stop']}: replay a run without it")
    paths = sorted(glob.glob(os.path.join(run_dir, "batches", "step_*.pt")))
    if not paths:
        raise SystemExit(f"no batches/step_*.pt in {run_dir}: train with train.dump_batches=true")
    steps = []
    for path in paths:
        dump = torch.load(path, weights_only=True)
        rows = [x for x in (replay_group(g, algo) for g in dump["groups"]) if x is not None]
        if not rows:
            continue
        step = {"step": int(os.path.basename(path)[5:-3]), "mixed": len(rows),
                "stopped": sum(x[2] for x in rows), "samples": sum(x[3] for x in rows),
                "length_plus": statistics.mean(x[1][0] for x in rows),
                "length_minus": statistics.mean(x[1][1] for x in rows)}
        for policy in POLICIES:
            for j, key in enumerate(("a_plus", "a_minus", "p")):
                step[f"{key}/{policy}"] = statistics.mean(x[0][policy][j] for x in rows)
        steps.append(step)
    return steps


def report(steps: list[dict]) -> str:
    lines = ["step | mixed | stopped/samples | A+ off/as_incorrect/exclude | A- off/as_incorrect/exclude | L+ L- "
             "| p off/as_incorrect/exclude"]
    for s in steps:
        lines.append(" | ".join([str(s["step"]), str(s["mixed"]), f"{s['stopped']}/{s['samples']}"]
                                + [" / ".join(f"{s[f'{k}/{p}']:.2f}" for p in POLICIES) for k in ("a_plus", "a_minus")]
                                + [f"{s['length_plus']:.0f} {s['length_minus']:.0f}",
                                   " / ".join(f"{s[f'p/{p}']:.2f}" for p in POLICIES)]))
    for p in POLICIES:
        plus = statistics.mean(s[f"a_plus/{p}"] for s in steps)
        minus = statistics.mean(s[f"a_minus/{p}"] for s in steps)
        lines.append(f"{p}: mean over steps A+ {plus:.3f}  A- {minus:.3f}  A+ + A- {plus + minus:.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", default="", help="also write the per-step numbers here")
    args = ap.parse_args()
    steps = replay(args.run_dir)
    print(report(steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run_dir": args.run_dir, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
