"""bench/head_to_head.py without training: the job list and its resume, the LR selection rule, and the analysis
(paired intervals, time to target, criteria, tables, plot) regenerated from synthetic summary files alone."""
import json
import math
import os
import statistics
import sys

import pytest

from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def h2h():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    return load_script("bench/head_to_head.py")


# Synthetic runs: GRPO reaches 0.5 at 60 s per step; BPPO the same accuracy minus 0.01 at 30 s per step and half
# the length; per seed a small offset so that the intervals have a spread.
FINAL = {"grpo": [0.50, 0.52, 0.48, 0.51], "bppo": [0.49, 0.50, 0.48, 0.49]}
LENGTH = {"grpo": [100.0, 110.0, 90.0, 100.0], "bppo": [50.0, 60.0, 40.0, 50.0]}
STEP_S = {"grpo": 60.0, "bppo": 30.0}


def bits(acc, n=256, shift=0):
    k = round(acc * n)
    return "".join("1" if (i + shift) % n < k else "0" for i in range(n))


def summary(h2h, name, kind, arm, seed, lr, checks, step_s, final=None, steps=40):
    return {"run": name, "kind": kind, "arm": arm, "seed": seed, "lr": lr, "data_seed": 0, "steps": steps,
            "protocol": h2h.PROTOCOL, "command": ["torchrun", "..."], "git": {"commit": "abc", "dirty": False},
            "wall_seconds": 1.0, "train_seconds": step_s * steps,
            "checks": [{"step": st, "train_seconds": st * step_s, "accuracy": a, "length_mean": 80.0,
                        "length_median": 80.0, "prompts": 64} for st, a in checks],
            "step_series": [{"step": i + 1, "time/step": step_s, "time/rollout": step_s / 3,
                             "time/logprob": step_s / 3, "time/update": step_s / 3, "time/sync": 0.0,
                             "response_length/mean": 80.0, "samples": 64, "selected/tokens": 1000,
                             "rollout/tokens_generated": 100 * step_s}
                            for i in range(steps)],
            "final": final}


def write_synthetic(h2h, results, seeds=(0, 1, 2, 3)):
    p = h2h.PROTOCOL
    os.makedirs(results, exist_ok=True)
    runs = [summary(h2h, "base", "base", None, 0, None, [(0, 0.2)], 0.0, steps=0)]
    # LR sweep: grpo best at 2e-5; bppo ties (within one check prompt) between 2e-5 and 4e-5 -> 2e-5
    lr_scores = {"grpo": {1e-5: 0.30, 2e-5: 0.40, 4e-5: 0.35}, "bppo": {1e-5: 0.30, 2e-5: 0.40, 4e-5: 0.405}}
    for arm, scores in lr_scores.items():
        for lr, score in scores.items():
            name = f"lr-{arm}-{h2h.lr_tag(lr)}-s{p['lr_seed']}"
            runs.append(summary(h2h, name, "lr", arm, p["lr_seed"], lr,
                                [(5, score - 0.05), (10, score + 0.05)], STEP_S[arm], steps=p["lr_steps"]))
    for arm in ("grpo", "bppo"):
        for s in seeds:
            acc, length = FINAL[arm][s], LENGTH[arm][s]
            checks = [(st, min(acc, 0.2 + 0.1 * st / 5)) for st in range(5, 41, 5)]
            final = {"greedy": {"pass@1": round(acc * 256) / 256, "n": 256, "bits": bits(acc, shift=s),
                                "length": {"mean": length}},
                     "mean_at_k": {"k": 4, "accuracy": acc - 0.02}}
            runs.append(summary(h2h, f"{arm}-s{s}", "main", arm, s, 2e-5, checks, STEP_S[arm], final))
    for r in runs:
        with open(os.path.join(results, f"{r['run']}.json"), "w") as f:
            json.dump(r, f)


def test_jobs_order_and_resume(h2h, tmp_path):
    p = h2h.PROTOCOL
    todo = h2h.jobs(p, ["grpo", "bppo"], [0, 1], "all")
    names = [j[0] for j in todo]
    assert names[0] == "base"
    assert names[1:7] == [f"lr-{a}-{h2h.lr_tag(lr)}-s{p['lr_seed']}" for a in ("grpo", "bppo") for lr in p["lr_grid"]]
    assert names[7:] == ["grpo-s0", "bppo-s0", "grpo-s1", "bppo-s1"]       # seed-major: pairs complete early
    assert [j[0] for j in h2h.jobs(p, ["grpo"], [0], "lr")] == names[1:4]
    full = [j[0] for j in h2h.jobs(p, list(h2h.ARMS), p["seeds"], "main")]
    assert full[:5] == ["grpo-s0", "bppo-s0", "random_pair-s0", "bppo_fixed-s0", "bppo_literal-s0"]
    assert full[10:] == ["grpo-s2", "bppo-s2", "random_pair-s2", "grpo-s3", "bppo-s3", "random_pair-s3"]
    assert [j[0] for j in h2h.jobs(p, list(h2h.ARMS), p["seeds"], "lr")][-1] == f"lr-bppo-4e-5-s{p['lr_seed']}"
    assert [j[0] for j in h2h.jobs(p, ["bppo_fixed"], [2, 3], "main")] == []                 # not in the protocol
    assert [j[0] for j in h2h.jobs(p, ["bppo_fixed"], [2, 3], "main", extend=True)] == ["bppo_fixed-s2",
                                                                                         "bppo_fixed-s3"]
    # the exploratory probes run only when asked for, never with the protocol's jobs
    assert [j[0] for j in h2h.jobs(p, list(h2h.PROBE_ARMS), [0], "probe")] == ["probe-bppo_full-s0",
                                                                               "probe-random_pair_full-s0"]
    assert not any(j[1] == "probe" for j in h2h.jobs(p, list(h2h.ARM_OVERRIDES), p["seeds"], "all", extend=True))
    with pytest.raises(SystemExit):
        h2h.parse_args(["--phase", "main", "--arms", "bppo_full"])
    assert h2h.parse_args(["--phase", "probe"]).arms == list(h2h.PROBE_ARMS)
    write_synthetic(h2h, str(tmp_path), seeds=(0,))
    done = h2h.load_summaries(str(tmp_path))
    assert {"base", "grpo-s0", "bppo-s0"} <= set(done)
    # --plan reports done jobs and runs nothing
    assert h2h.main(["--plan", "--results", str(tmp_path), "--arms", "grpo,bppo", "--seeds", "0"]) == 0
    assert h2h.main(["--plan", "--phase", "probe", "--results", str(tmp_path), "--seeds", "0"]) == 0


def test_lr_selection_rule(h2h, tmp_path):
    write_synthetic(h2h, str(tmp_path))
    summaries = h2h.load_summaries(str(tmp_path))
    chosen = h2h.select_lrs(summaries, h2h.PROTOCOL, ["grpo", "bppo", "random_pair"])
    assert chosen["grpo"][0] == 2e-5
    assert chosen["bppo"][0] == 2e-5            # 0.405 vs 0.40: within 1/64, the smaller LR wins
    assert chosen["random_pair"][0] == 2e-5     # a one-key change of BPPO: BPPO's LR
    assert h2h.select_lrs(summaries, h2h.PROTOCOL, ["bppo_full"])["bppo_full"][0] == 2e-5   # a probe: BPPO's LR
    del summaries[f"lr-bppo-{h2h.lr_tag(4e-5)}-s{h2h.PROTOCOL['lr_seed']}"]
    assert set(h2h.select_lrs(summaries, h2h.PROTOCOL, ["grpo", "bppo", "random_pair"])) == {"grpo"}  # wait


def test_commands_are_exact(h2h):
    cmd = h2h.job_command(h2h.PROTOCOL, "/m", "/r/bppo-s1", "main", "random_pair", 1, 2e-5)
    assert "algorithm.selector=random_pair" in cmd and "optim.lr=2e-05" in cmd and "data.seed=0" in cmd
    assert "sampling.seed=1" in cmd and "train.steps=40" in cmd and "eval.samples=0" in cmd
    # later keys win: the job's checkpoint and export settings come after time_to_accuracy's defaults
    assert cmd.index("checkpoint.dir=/r/bppo-s1/checkpoints") > cmd.index("checkpoint.dir=")
    assert cmd.index("train.export_hf=true") > cmd.index("train.export_hf=false")
    assert "data.prompts_per_step=4" in cmd and "data.train=arithmetic:one_op_25" in cmd
    lr_cmd = h2h.job_command(h2h.PROTOCOL, "/m", "/r/x", "lr", "grpo", 100, 1e-5)
    assert "train.export_hf=true" not in lr_cmd and "train.steps=10" in lr_cmd and "optim.lr=1e-05" in lr_cmd
    probe = h2h.job_command(h2h.PROTOCOL, "/m", "/r/p", "probe", "bppo_full", 0, 2e-5)
    assert "algorithm.prefix=full" in probe and "train.steps=10" in probe and "train.export_hf=true" not in probe
    base = h2h.job_command(h2h.PROTOCOL, "/m", "/r/base", "base", None, 0, None)
    assert "train.steps=0" in base and not any(x.startswith("optim.lr") for x in base)
    # every job's command is a valid config (keys exist, values in range), as the trainer will load it
    from megatron_bppo.config import load_config

    for job in h2h.jobs(h2h.PROTOCOL, list(h2h.ALL_ARMS), h2h.PROTOCOL["seeds"], "all", extend=True):
        name, kind, arm, seed, lr = job
        c = h2h.job_command(h2h.PROTOCOL, ROOT, f"/r/{name}", kind, arm, seed, lr or 2e-5)
        cfg = load_config(os.path.join(ROOT, c[c.index("--config") + 1]), c[c.index("--config") + 2:])
        assert cfg.data.train == "arithmetic:one_op_25" and cfg.data.eval_size == 64 and cfg.eval.interval == 5
        assert cfg.checkpoint.dir == f"/r/{name}/checkpoints" and cfg.data.seed == 0
        if kind == "main":
            assert cfg.algorithm.name == ("grpo" if arm == "grpo" else "bppo") and cfg.optim.lr == 2e-5
    ev = h2h.final_eval_command(h2h.PROTOCOL, "/r/x/hf", "/r/x/final_eval.json", 3)
    assert "--final-eval" in ev and "--sampling-seed" in ev and ev[ev.index("--preset") + 1] == "one_op_25"
    assert "--nproc-per-node=2" in ev and "data.prompts_per_step=4" in ev


def test_analysis_from_summaries_alone(h2h, tmp_path):
    write_synthetic(h2h, str(tmp_path))
    # a one-key change of BPPO at two seeds, at half BPPO's step time and a shorter final length
    extra = {0: 0.47, 1: 0.52}
    for s, acc in extra.items():
        final = {"greedy": {"pass@1": round(acc * 256) / 256, "n": 256, "bits": bits(acc, shift=s),
                            "length": {"mean": 25.0}}, "mean_at_k": {"k": 4, "accuracy": acc}}
        r = summary(h2h, f"stop_exclude-s{s}", "main", "stop_exclude", s, 2e-5, [(40, acc)], 15.0, final)
        with open(tmp_path / f"stop_exclude-s{s}.json", "w") as f:
            json.dump(r, f)
    result, text = h2h.write_analysis(str(tmp_path))
    for f in ("analysis.json", "analysis.md", "head_to_head.png"):
        assert os.path.getsize(tmp_path / "analysis" / f) > 0
    e = result["vs_grpo"]["bppo"]
    diffs = [round(b * 256) / 256 - round(g * 256) / 256 for g, b in zip(FINAL["grpo"], FINAL["bppo"])]
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    assert e["accuracy_diff"]["mean"] == pytest.approx(m)
    assert e["accuracy_diff"]["hi"] - m == pytest.approx(3.182 * sd / 2)          # t(0.975, 3) * sd / sqrt(4)
    ratios = [b / g for g, b in zip(LENGTH["grpo"], LENGTH["bppo"])]
    assert e["length_ratio"]["mean"] == pytest.approx(math.exp(statistics.fmean(math.log(r) for r in ratios)))
    assert e["step_time_ratio"]["mean"] == pytest.approx(2.0)
    assert e["rollout_time_ratio"]["mean"] == pytest.approx(0.5)                  # arm / GRPO
    assert e["rollout_token_ratio"]["mean"] == pytest.approx(0.5)
    assert e["mean_at_k_diff"]["mean"] == pytest.approx(statistics.fmean(b - g for g, b in zip(FINAL["grpo"],
                                                                                              FINAL["bppo"])))
    boot = e["accuracy_diff_problem_bootstrap"]
    assert boot["lo"] <= boot["mean"] <= boot["hi"] and boot["mean"] == pytest.approx(m)
    # target: 0.95 x GRPO's mean last check; both reach it at the same step, BPPO at half the seconds
    assert result["target"] == pytest.approx(0.95 * statistics.fmean(FINAL["grpo"]))
    assert e["speedup_to_target"]["mean"] == pytest.approx(2.0) and e["reached_target"] == "4/4"
    # the base job's step-0 check is in front of every run's curve
    assert result["runs"]["bppo-s0"]["checks"][0][:3] == (0, 0.0, 0.2) or \
        list(result["runs"]["bppo-s0"]["checks"][0][:3]) == [0, 0.0, 0.2]
    c = result["criteria"]["bppo"]
    assert c["length_at_most_0.7x"] is True and c["faster_to_target"] is True
    assert c["accuracy_non_inferior"] is (e["accuracy_diff"]["lo"] > -0.03)
    assert "| bppo | 4 |" in text and "LR sweep" in text
    # the ablation is also paired against bppo, over the seeds both ran; bppo and grpo themselves are not
    assert set(result["vs_bppo"]) == {"stop_exclude"} and "stop_exclude" in result["vs_grpo"]
    v = result["vs_bppo"]["stop_exclude"]
    assert v["seeds"] == [0, 1]
    assert v["accuracy_diff"]["mean"] == pytest.approx(statistics.fmean(
        round(extra[s] * 256) / 256 - round(FINAL["bppo"][s] * 256) / 256 for s in extra))
    assert v["length_ratio"]["mean"] == pytest.approx(math.sqrt(25.0 / LENGTH["bppo"][0] * 25.0 / LENGTH["bppo"][1]))
    assert v["step_time_ratio"]["mean"] == pytest.approx(2.0)                      # bppo / arm
    assert v["rollout_time_ratio"]["mean"] == pytest.approx(0.5) and v["rollout_token_ratio"]["mean"] == \
        pytest.approx(0.5)
    assert "| arm | seeds | final pass@1 | diff vs bppo (t over seeds) |" in text
    assert "| stop_exclude | 2 |" in text.split("diff vs bppo")[1]
    assert result["lr"]["grpo"]["scores"]["2e-5"] == pytest.approx(0.40)   # mean of the checks at 5 and 10
    # the CLI path: the same files from the summaries alone
    os.remove(tmp_path / "analysis" / "analysis.md")
    assert h2h.main(["--analyze-only", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "analysis" / "analysis.md").read_text() == text


def test_intervals(h2h):
    assert h2h.mean_ci([1.0]) == {"mean": 1.0, "lo": None, "hi": None, "n": 1}
    ci = h2h.mean_ci([0.0, 1.0])
    assert ci["lo"] == pytest.approx(0.5 - 12.706 * math.sqrt(0.5) / math.sqrt(2))
    r = h2h.ratio_ci([2.0, 2.0, 2.0])
    assert r["mean"] == pytest.approx(2.0) and r["lo"] == pytest.approx(2.0)
    assert h2h.time_to_target({"checks": [{"step": 5, "train_seconds": 50.0, "accuracy": 0.3}]}, 0.4) is None


def test_summary_from_metrics(h2h, tmp_path):
    """summarize_run: a run directory's metrics.jsonl (eval records merged into their step) -> checks with the
    training seconds so far, the per-step series without eval/sync keys, and the final evaluation as given."""
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/response_length/mean": 90.0, "eval/prompts": 64},
            {"step": 1, "time/step": 30.0, "time/rollout": 10.0, "response_length/mean": 80.0, "samples": 24,
             "rollout/tokens_generated": 2000, "sync/bytes": 5, "loss": 0.123456789},
            {"step": 2, "eval/accuracy": 0.3, "eval/response_length/mean": 70.0, "eval/prompts": 64},
            {"step": 2, "time/step": 20.0, "time/rollout": 8.0, "response_length/mean": 60.0, "samples": 20}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = h2h.summarize_run("bppo-s0", "main", "bppo", 0, 2e-5, str(tmp_path), h2h.PROTOCOL, ["cmd"], {"greedy": {}},
                          99.0, {"commit": "abc", "dirty": False})
    assert [(c["step"], c["train_seconds"], c["accuracy"]) for c in s["checks"]] == [(0, 0.0, 0.2), (2, 50.0, 0.3)]
    assert s["steps"] == 2 and s["train_seconds"] == 50.0 and s["step_series"][0]["rollout/tokens_generated"] == 2000
    assert "sync/bytes" not in s["step_series"][0] and s["step_series"][0]["loss"] == 0.12346
    assert s["overrides"] == h2h.ARMS["bppo"] and s["git"]["commit"] == "abc" and s["final"] == {"greedy": {}}
