"""`megatron-bppo eval` (issue 29): per-problem evaluation, pass@k, the paired comparison, and the command on an HF
directory and on Megatron checkpoints saved at TP2 and PP2 (identical per-problem verdicts), both backends, bad
input."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_procs

from megatron_bppo.config import SamplingConfig
from megatron_bppo.data.chat import RenderedPrompt
from megatron_bppo.data.datasets import PromptExample
from megatron_bppo.evaluation import evaluate_problems, paired_compare, pass_at_k, summarize
from megatron_bppo.testing.rewards import even_length
from megatron_bppo.testing.scripted_engine import ScriptedEngine, hashed_outcome


# ------------------------------------------------------------------------------------------ pure functions
def enumerated_pass_at_k(verdicts: list, k: int) -> float:
    """The share of k-subsets of the samples with at least one correct: what pass@k estimates, by enumeration."""
    subsets = list(itertools.combinations(verdicts, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_enumerated_share(n):
    for c in range(n + 1):
        verdicts = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(enumerated_pass_at_k(verdicts, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def prompts(n):
    return [RenderedPrompt(PromptExample(f"p{i}", "42", prompt=f"q{i}"), f"q{i}", [3, 4, i + 5]) for i in range(n)]


def test_scripted_evaluation_records_and_summary():
    """Greedy and 6 seeded samples per problem through the evaluation's own path (engine.generate, score_once):
    the records hold every verdict and length; pass@j is the enumerated share averaged over problems."""
    engine = ScriptedEngine(hashed_outcome(lambda ids: 0.15 * (ids[-1] - 4), max_len=12))
    probs = prompts(6)
    problems = evaluate_problems(engine, probs, SamplingConfig(temperature=1.0, max_tokens=12, seed=0),
                                 even_length, {}, samples=6, seed=11)
    assert [p["id"] for p in problems] == [f"p{i}" for i in range(6)]
    assert all(len(p["samples"]) == 6 for p in problems)
    again = evaluate_problems(engine, probs, SamplingConfig(temperature=1.0, max_tokens=12, seed=0),
                              even_length, {}, samples=6, seed=11)
    assert again == problems                                  # seeded: the same samples
    s = summarize(problems)
    verdicts = [[r["correct"] for r in p["samples"]] for p in problems]
    assert 0 < sum(map(sum, verdicts)) < 36                   # mixed, so pass@j is not trivially 0 or 1
    for j in (1, 2, 4, 6):
        assert s[f"pass@{j}_sampled"] == pytest.approx(
            sum(enumerated_pass_at_k(v, j) for v in verdicts) / 6, abs=1e-12)
    assert s["mean@6"] == pytest.approx(sum(map(sum, verdicts)) / 36)
    assert s["pass@1"] == sum(p["greedy"]["correct"] for p in problems) / 6
    lengths = [p["greedy"]["length"] for p in problems]
    assert s["greedy_length"]["mean"] == pytest.approx(sum(lengths) / 6)


def record(pid, greedy_ok, length, sampled=()):
    return {"id": pid, "greedy": {"correct": greedy_ok, "length": length, "finish": "stop", "response": ""},
            "samples": [{"correct": ok, "length": 1, "finish": "stop", "response": ""} for ok in sampled]}


def test_paired_compare_by_hand():
    """Two problems, A right on one of them only: the bootstrap mean of the difference is 0, 1/2 or 1 with
    probabilities 1/4, 1/2, 1/4, so the 95 % percentile interval is [0, 1] (P(0) = 1/4 > 2.5 %). Lengths differ by
    the same 3 tokens on both problems: interval [3, 3]. B's extra problem is not paired."""
    a = [record("x", True, 10, [True, False]), record("y", False, 20, [False, False])]
    b = [record("y", False, 17, [False, False]), record("x", False, 7, [True, True]),
         record("z", True, 5, [True, True])]
    r = paired_compare(a, b, resamples=4000, seed=0)
    assert r["problems"] == 2 and r["only_a_correct"] == 1 and r["only_b_correct"] == 0
    assert r["figures"]["pass@1"]["diff"] == 0.5 and r["figures"]["pass@1"]["ci95"] == [0.0, 1.0]
    assert r["figures"]["greedy_length"]["diff"] == 3.0 and r["figures"]["greedy_length"]["ci95"] == [3.0, 3.0]
    assert r["figures"]["mean@k"] == {"a": 0.25, "b": 0.5, "diff": -0.25, "ci95": [-0.5, 0.0]}
    with pytest.raises(ValueError, match="share no problem"):
        paired_compare(a, [record("q", True, 1)])


# ------------------------------------------------------------------------------------------ the command
def cli(*args, nproc=1, check=True):
    return run_procs(["-m", "megatron_bppo.cli", "eval", *args], nproc=nproc, check=check)


COMMON = ["--data", "arithmetic:l0", "--limit", "6", "--samples", "2",
          "sampling.max_tokens=12", "reward.name=megatron_bppo.testing.rewards:even_length"]


def problems_of(out):
    with open(os.path.join(out, "problems.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def checkpoints(tiny_qwen2, tmp_path_factory):
    """The tiny model's weights as Megatron checkpoints written at TP2 and at PP2."""
    work = tmp_path_factory.mktemp("eval_ckpts")
    out = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        out[name] = str(work / name)
        run_procs(["tools/convert_checkpoint.py", "hf-to-mcore", "--hf-dir", tiny_qwen2, "--out-dir", out[name],
                   "--tp", str(tp), "--pp", str(pp)], nproc=2)
    return out


@pytest.mark.slow
def test_hf_and_megatron_checkpoints_agree(tiny_qwen2, checkpoints, tmp_path):
    """The same weights evaluated as an HF directory (world 1), as the TP2 checkpoint (world 1: resharded on load)
    and as the PP2 checkpoint at its own layout under torchrun (two engine replicas): identical responses and
    verdicts, problem by problem; then --compare of two of them reports a zero difference."""
    hf, tp2, pp2 = (str(tmp_path / n) for n in ("hf", "tp2", "pp2"))
    cli("--model", tiny_qwen2, "--out", hf, *COMMON, "rollout.backend=hf")
    cli("--model", checkpoints["tp2"], "--out", tp2, *COMMON, "rollout.backend=hf")
    cli("--model", checkpoints["pp2"], "--out", pp2, *COMMON, "rollout.backend=hf", "parallel.pp=2", nproc=2)
    ref = problems_of(hf)
    assert len(ref) == 6 and all(len(p["samples"]) == 2 for p in ref)
    for out in (tp2, pp2):
        assert problems_of(out) == ref, out
    with open(os.path.join(tp2, "summary.json")) as f:
        summary = json.load(f)
    assert summary["model"]["kind"] == "megatron" and summary["model"]["step"] == 0
    assert summary["model"]["checkpoint"].endswith("iter_0000000")
    proc = cli("--compare", hf, pp2, "--resamples", "500")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == 6 and result["figures"]["pass@1"]["diff"] == 0.0
    assert result["figures"]["pass@1"]["ci95"] == [0.0, 0.0]


@pytest.mark.slow
def test_vllm_backend(tiny_qwen2, tmp_path):
    out = str(tmp_path / "vllm")
    cli("--model", tiny_qwen2, "--out", out, *COMMON, "rollout.backend=vllm", "rollout.max_model_len=256",
        "rollout.kv_cache_memory_bytes=33554432")
    problems = problems_of(out)
    assert [p["id"] for p in problems] == [f"arith-l0-test-1-{i}" for i in range(6)]
    assert all(len(p["samples"]) == 2 and p["greedy"]["length"] <= 12 for p in problems)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["settings"]["backend"] == "vllm" and s["figures"]["problems"] == 6
    assert s["figures"]["mean@2"] == sum(r["correct"] for p in problems for r in p["samples"]) / 12


def refused(*args) -> str:
    proc = cli(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stderr


@pytest.mark.slow
def test_bad_input_is_refused_and_nothing_written(tiny_qwen2, checkpoints, tmp_path):
    out = str(tmp_path / "out")
    assert "is not a directory" in refused("--model", str(tmp_path / "missing"), "--out", out, *COMMON)
    broken = str(tmp_path / "broken")
    shutil.copytree(checkpoints["tp2"], broken)
    os.remove(os.path.join(broken, "iter_0000000", "trainer_state.pt"))
    err = refused("--model", broken, "--out", out, *COMMON)
    assert "no complete checkpoint" in err and "trainer_state.pt" in err
    err = refused("--model", os.path.join(broken, "iter_0000000"), "--out", out, *COMMON)
    assert "incomplete checkpoint" in err
    no_refs = tmp_path / "no_refs.jsonl"
    no_refs.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"What is {i} + 1?"}) + "\n" for i in range(3)))
    err = refused("--model", tiny_qwen2, "--out", out, "--data", str(no_refs), "rollout.backend=hf")
    assert "data:" in err
    assert not os.path.exists(out)
    os.makedirs(out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        f.write("{}")
    err = refused("--model", tiny_qwen2, "--out", out, *COMMON, "rollout.backend=hf")
    assert "already holds summary.json" in err and "--overwrite" in err
    with open(os.path.join(out, "summary.json")) as f:
        assert f.read() == "{}"


def test_compare_refuses_different_settings(tmp_path):
    """Two evaluation directories that differ in the problem set or a setting are not compared: the refusal names
    every difference."""
    from megatron_bppo.eval_command import write_outputs

    base = {"data": {"spec": "arithmetic:l0", "fingerprint": "abc", "problems": 1},
            "settings": {"samples": 2, "seed": 0, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12,
                         "reward": "math", "reward_kwargs": {}}, "model": {"path": "m"}}
    other = json.loads(json.dumps(base))
    other["settings"]["temperature"], other["data"]["fingerprint"] = 0.7, "def"
    write_outputs(str(tmp_path / "a"), base, [record("x", True, 1)])
    write_outputs(str(tmp_path / "b"), other, [record("x", True, 1)])
    proc = subprocess.run([sys.executable, "-m", "megatron_bppo.cli", "eval", "--compare", str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "settings.temperature: 1.0 vs 0.7" in proc.stderr and "data.fingerprint" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megatron_bppo.cli", "eval", "--compare", str(tmp_path / "a"),
                           str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "has no summary.json" in proc.stderr
