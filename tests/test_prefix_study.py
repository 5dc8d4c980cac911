"""bench/prefix_study.py without training: the long-regime rule, the screen ranking, the choice, the decision, the
job list as each phase's results arrive, the reproduction check, and the analysis from synthetic summaries."""
import json
import os
import sys

import pytest

from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    return load_script("bench/prefix_study.py")


def run(name, arm, seed, final, lengths=(), kind="main", steps=40):
    """A summary: checks every 5 steps with the given check lengths (default 50), final greedy pass@1 `final`."""
    lengths = list(lengths) or [50.0] * 8
    checks = [{"step": 5 * (i + 1), "train_seconds": 150.0 * (i + 1), "accuracy": round(min(final, 0.1 * (i + 1)), 4),
               "length_mean": length, "length_median": length, "prompts": 64} for i, length in enumerate(lengths)]
    n = round(final * 256)
    return {"run": name, "kind": kind, "arm": arm, "seed": seed, "lr": 2e-5, "data_seed": 0, "steps": steps,
            "protocol": {}, "command": [], "git": {"commit": "abc", "dirty": False}, "wall_seconds": 1.0,
            "train_seconds": 30.0 * steps, "checks": checks,
            "step_series": [{"step": i + 1, "time/step": 30.0, "time/rollout": 10.0, "time/logprob": 5.0,
                             "time/update": 5.0, "samples": 24, "rollout/tokens_generated": 2000,
                             "selected/tokens": 200, "loss": 0.1, "response_length/mean": 60.0}
                            for i in range(steps)],
            "final": {"greedy": {"pass@1": n / 256, "n": 256, "bits": "1" * n + "0" * (256 - n),
                                 "length": {"mean": 40.0}}, "mean_at_k": {"k": 2, "accuracy": final}}}


def test_long_regime_rule(study):
    assert not study.is_long(run("a", "full", 0, 0.5, [150, 150, 90, 90, 90, 90, 90, 90]))   # long only up to 10
    assert study.is_long(run("a", "full", 0, 0.5, [50, 50, 101, 50, 50, 50, 50, 50]))        # step 15: 101 > 100
    assert not study.is_long(run("a", "full", 0, 0.5, [50, 50, 100, 50, 50, 50, 50, 50]))    # 100 is not > 100


def screen(study, finals, long_seeds=()):
    """Screen summaries: candidate -> (pass@1 on seed 0, on seed 3); `long_seeds`: (candidate, seed) that go long."""
    out = {}
    for c, accs in finals.items():
        for sd, acc in zip(study.SCREEN_SEEDS, accs):
            lengths = [50, 50, 200, 50, 50, 50, 50, 50] if (c, sd) in long_seeds else ()
            out[f"{c}-s{sd}"] = run(f"{c}-s{sd}", c, sd, acc, lengths)
    return out


def reproduced():
    """The reproduction and the committed run it equals (the study's gate for reusing seeds 0-3)."""
    return {"repro-bppo-s3": run("repro-bppo-s3", "bppo", 3, 0.5),
            "bppo-s3:committed": run("bppo-s3", "bppo", 3, 0.5)}


def test_reproduction_gates_the_screen_and_the_reuse(study, tmp_path):
    todo, waiting = study.study_jobs({})
    assert [j[0] for j in todo] == ["repro-bppo-s3"] and waiting == "screen" and todo[0][2:4] == ("bppo", 3)
    names = list(study.CANDIDATES)
    todo, waiting = study.study_jobs(reproduced())
    assert [j[0] for j in todo] == ["repro-bppo-s3"] + [f"{c}-s{s}" for s in (0, 3) for c in names]
    assert waiting == "explore"
    failed = reproduced()
    failed["repro-bppo-s3"]["step_series"][3]["loss"] = 0.2
    assert study.repro_state(failed) == "failed"
    todo, _ = study.study_jobs(failed)                    # no reuse: the study reruns grpo / bppo at seeds 0-3
    assert [j[0] for j in todo[1:9]] == study.REUSED and todo[1][1:4] == ("main", "grpo", 0)
    # load_all: the committed seeds 0-3 come in only after a successful reproduction
    results, h2h_results = tmp_path / "study", tmp_path / "h2h"
    results.mkdir()
    h2h_results.mkdir()
    for a in ("grpo", "bppo"):
        for sd in range(4):
            (h2h_results / f"{a}-s{sd}.json").write_text(json.dumps(run(f"{a}-s{sd}", a, sd, 0.5)))
    assert set(study.load_all(str(results), str(h2h_results))) == {"bppo-s3:committed"}
    (results / "repro-bppo-s3.json").write_text(json.dumps(run("repro-bppo-s3", "bppo", 3, 0.5)))
    assert set(study.load_all(str(results), str(h2h_results))) == {"repro-bppo-s3", "bppo-s3:committed",
                                                                    *study.REUSED}


def test_ranking_choice_and_jobs_by_phase(study):
    names = list(study.CANDIDATES)
    assert names == ["full", "pair", "half_contrast", "full_contrast", "to_correct"]
    # pair is the most accurate but long on seed 3: a candidate with no long seed ranks first
    summaries = screen(study, {"full": (0.50, 0.52), "pair": (0.70, 0.70), "half_contrast": (0.40, 0.41),
                               "full_contrast": (0.55, 0.50), "to_correct": (0.30, 0.30)},
                       long_seeds={("pair", 3), ("to_correct", 0)})
    summaries.update(reproduced())
    assert study.rank_candidates(summaries, study.SCREEN_SEEDS) == ["full_contrast", "full", "half_contrast", "pair",
                                                                    "to_correct"]
    assert study.explored(summaries) == ["full_contrast", "full"]
    # the drop rule: the screen's training hours at section 6's speed (the reproduction ran at 1200 s, the committed
    # run at 1200 s: speed 1) above SCREEN_TRAIN_HOURS_MAX -> only the top candidate is explored
    at_limit = 3600 * study.SCREEN_TRAIN_HOURS_MAX / 10
    screened = [f"{c}-s{sd}" for c in names for sd in study.SCREEN_SEEDS]
    edge = dict(summaries, **{n: dict(summaries[n], train_seconds=at_limit) for n in screened})
    assert study.screen_train_hours(edge) == pytest.approx(study.SCREEN_TRAIN_HOURS_MAX)
    assert study.explored(edge) == ["full_contrast", "full"]          # at the limit: both
    slow = dict(summaries, **{n: dict(summaries[n], train_seconds=at_limit + 1) for n in screened})
    assert study.explored(slow) == ["full_contrast"]                   # above it: only the top one
    assert [j[0] for j in study.study_jobs(slow)[0][11:]] == ["full_contrast-s1", "full_contrast-s2"]
    half_speed = dict(slow, **{"repro-bppo-s3": dict(slow["repro-bppo-s3"], train_seconds=2400.0)})
    assert study.machine_speed(half_speed) == 2.0                      # a machine twice as slow: hours halved
    assert study.explored(half_speed) == ["full_contrast", "full"]
    todo, waiting = study.study_jobs(summaries)
    assert [j[0] for j in todo[11:]] == ["full_contrast-s1", "full-s1", "full_contrast-s2", "full-s2"]
    assert waiting == "confirm" and study.choose_candidate(summaries) is None
    # exploration: full_contrast goes long on seed 1, full does not -> full is chosen despite a lower pass@1
    summaries["full_contrast-s1"] = run("x", "full_contrast", 1, 0.60, [50, 50, 50, 150, 50, 50, 50, 50])
    summaries["full_contrast-s2"] = run("x", "full_contrast", 2, 0.60)
    summaries["full-s1"] = run("x", "full", 1, 0.45)
    summaries["full-s2"] = run("x", "full", 2, 0.45)
    assert study.choose_candidate(summaries) == "full"
    todo, waiting = study.study_jobs(summaries, optional=True)
    confirm = [j[0] for j in todo[15:]]
    assert waiting is None
    assert confirm[:5] == ["full-s4", "grpo-s4", "bppo-s4", "full-s5", "grpo-s5"]
    assert sum(n.startswith("full-s") for n in confirm) == 8 and sum(n.startswith("grpo") for n in confirm) == 8
    assert [n for n in confirm if n.startswith("bppo")] == ["bppo-s4", "bppo-s5", "bppo-s6", "bppo-s7"]
    assert confirm[-4:] == [f"full_p8-s{s}" for s in (4, 5, 6, 7)]
    assert "data.prompts_per_step=8" in study.ALL_ARMS["full_p8"] and study.PROTOCOL["lr_from"]["full"] == "bppo"


def test_decision_from_confirmation_seeds_alone(study):
    s = {f"full-s{sd}": run("x", "full", sd, 0.60) for sd in study.CONFIRM_SEEDS}
    s.update({f"bppo-s{sd}": run("x", "bppo", sd, 0.55, [50, 50, 150, 50, 50, 50, 50, 50] if sd == 4 else ())
              for sd in study.DEFAULT_SEEDS})
    d = study.decide(s, "full")
    assert d["becomes_default"] and d["long_seeds"] == {"full": "0/8", "bppo": "1/4"}
    assert d["accuracy_diff_vs_bppo"]["mean"] == pytest.approx(round(0.60 * 256) / 256 - round(0.55 * 256) / 256)
    s["full-s9"] = run("x", "full", 9, 0.60, [50, 50, 150, 50, 50, 50, 50, 50])
    s["full-s10"] = run("x", "full", 10, 0.60, [50, 50, 150, 50, 50, 50, 50, 50])
    d = study.decide(s, "full")                   # 2/8 = 0.25 is not below bppo's 1/4
    assert d["beats_on_accuracy"] and not d["beats_on_long_regime"] and not d["becomes_default"]
    del s["bppo-s7"]
    assert study.decide(s, "full") is None        # not every confirmation job is done


def test_reproduction_check(study):
    a, b = run("r", "bppo", 3, 0.5), run("bppo-s3", "bppo", 3, 0.5)
    assert study.reproduces(a, b) == []
    a["step_series"][6]["selected/tokens"] = 201
    a["checks"][2]["accuracy"] = 0.31
    diffs = study.reproduces(a, b)
    assert diffs == ["step 7 selected/tokens: 201 vs 200", "check @15: 0.31/50.0 vs 0.3/50.0"]


def test_analysis_from_summaries_alone(study, tmp_path):
    results, h2h_results = tmp_path / "study", tmp_path / "h2h"
    results.mkdir()
    h2h_results.mkdir()
    reused = [run(f"{a}-s{sd}", a, sd, acc) for a, acc in (("grpo", 0.6), ("bppo", 0.5)) for sd in range(4)]
    # the committed bppo-s3 and its reproduction agree on every step (run() is deterministic)
    reused.append(run("random_pair-s0", "random_pair", 0, 0.4))              # not reused: another arm
    fresh = list(screen(study, {c: (0.55, 0.55) for c in study.CANDIDATES}).values())
    repro = run("repro-bppo-s3", "bppo", 3, 0.5)
    for folder, runs in ((h2h_results, reused), (results, fresh + [repro])):
        for r in runs:
            (folder / f"{r['run']}.json").write_text(json.dumps(r))
    assert study.main(["--analyze-only", "--results", str(results), "--h2h-results", str(h2h_results)]) == 0
    out = results / "analysis"
    decision = json.loads((out / "decision.json").read_text())
    assert decision["repro"] == [] and decision["explored"] == ["full", "full_contrast"]   # ties: by name
    exploration = json.loads((out / "exploration.json").read_text())
    assert set(exploration["vs_grpo"]) == {"grpo", "bppo", *study.CANDIDATES}
    assert exploration["vs_grpo"]["full"]["seeds"] == [0, 3]
    assert exploration["vs_bppo"]["full"]["accuracy_diff"]["mean"] == pytest.approx(
        (round(0.55 * 256) - round(0.5 * 256)) / 256)
    assert "random_pair-s0" not in exploration["runs"] and "repro-bppo-s3" not in exploration["runs"]
    assert exploration["long_seeds"]["full"] == {"long": 0, "seeds": 2}
    assert (out / "exploration.png").stat().st_size > 0
    text = (out / "exploration.md").read_text()
    assert "Long regime (check length > 100 after step 10), seeds: grpo 0/4, bppo 0/4, full 0/2" in text
    before = {f: (out / f).read_text() for f in ("exploration.md", "confirmation.md", "decision.json")}
    assert study.main(["--analyze-only", "--results", str(results), "--h2h-results", str(h2h_results)]) == 0
    assert {f: (out / f).read_text() for f in before} == before                 # regenerates without a diff
