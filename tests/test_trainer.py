"""The actor-learner loop end to end on the tiny model, 2 ranks, real Megatron + vLLM: what the learner trains on,
metrics, SIGKILL + resume, stop signals, degenerate batches, and bad inputs caught before any work."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, run_procs, torchrun_command, wait_for

CONFIG = "examples/configs/tiny_bppo.yaml"
TEST_REWARD = "reward.name=megatron_bppo.testing.rewards:even_length"
# The reference BPPO run (and the killed one that must reproduce it) samples at T=0.7: the learner must score at
# the same temperature for the mismatch check below
BPPO_LAYOUT = ["parallel.pp=2", "sampling.temperature=0.7"]


def train_cmd(hf, run_dir, *overrides, nproc=2):
    args = ["-m", "megatron_bppo.cli", "train", "--config", CONFIG, f"model.path={hf}", f"run_dir={run_dir}",
            f"checkpoint.dir={run_dir}/ckpt", TEST_REWARD, "train.dump_batches=true", *overrides]
    if nproc > 1:
        return [*torchrun_command(nproc), *args]
    return [sys.executable, *args]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}


def train(hf, run_dir, *overrides, nproc=2, check=True, timeout=900):
    proc = subprocess.run(train_cmd(hf, run_dir, *overrides, nproc=nproc), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "loss" in r or "skipped/no_update_set" in r}


@pytest.fixture(scope="module")
def runs(tiny_qwen2, tmp_path_factory):
    work = tmp_path_factory.mktemp("trainer")
    out = {}
    for algo, layout in (("bppo", BPPO_LAYOUT), ("grpo", ["parallel.tp=2"])):
        run_dir = str(work / algo)
        train(tiny_qwen2, run_dir, f"algorithm.name={algo}", "checkpoint.save_interval=1", *layout)
        out[algo] = run_dir
    return out


def expected_sequences(dump, algo, min_tokens=4, ratio=0.5):
    """Reference selection written out by hand: BPPO = shortest correct + shortest incorrect of each mixed
    group (lowest index on ties), kept prefix = min(L, max(ceil(ratio * L), min_tokens)); GRPO = everything."""
    chosen = []
    for g in dump["groups"]:
        lengths = [len(c) for c in g["completions"]]
        if algo == "grpo":
            picks = range(len(lengths))
        else:
            right = [i for i, c in enumerate(g["correct"]) if c]
            wrong = [i for i, c in enumerate(g["correct"]) if not c]
            if not right or not wrong:
                continue
            picks = sorted([min(right, key=lambda i: (lengths[i], i)), min(wrong, key=lambda i: (lengths[i], i))])
        for i in picks:
            L = lengths[i]
            k = L if algo == "grpo" else min(L, max(math.ceil(ratio * L), min_tokens))
            chosen.append(g["prompt_ids"] + g["completions"][i][:k])
    return sorted(chosen)


@pytest.mark.parametrize("algo", ["bppo", "grpo"])
def test_learner_sees_exactly_the_chosen_sequences(runs, algo):
    batches = sorted(os.listdir(os.path.join(runs[algo], "batches")))
    assert len(batches) == 3
    logged = metrics(runs[algo])
    for step, name in enumerate(batches, start=1):
        dump = torch.load(os.path.join(runs[algo], "batches", name), weights_only=True)
        assert sorted(dump["sequences"]) == expected_sequences(dump, algo)
        if algo == "bppo":
            assert len(dump["sequences"]) == 2 * sum(1 for g in dump["groups"] if 0 < sum(g["correct"]) < len(g["correct"]))
        # the per-class metrics of the trained sequences: their advantages and full lengths, as dumped
        for label, want in (("correct", True), ("incorrect", False)):
            rows = [(a, len(dump["groups"][gi]["completions"][ci])) for a, (gi, ci) in zip(dump["adv"], dump["origin"])
                    if dump["groups"][gi]["correct"][ci] == want]
            assert rows, (step, label)
            assert logged[step][f"selected/adv_{label}"] == pytest.approx(sum(a for a, _ in rows) / len(rows))
            assert logged[step][f"selected/length_{label}"] == pytest.approx(sum(n for _, n in rows) / len(rows))
        assert logged[step]["selected/adv_correct"] > 0 > logged[step]["selected/adv_incorrect"]
        assert 0 < logged[step]["rollout/nll_per_token"] < 20


@pytest.mark.parametrize("algo", ["bppo", "grpo"])
def test_metrics_summary_checkpoints_and_plots(runs, algo):
    run_dir = runs[algo]
    m = metrics(run_dir)
    assert sorted(m) == [1, 2, 3]
    for record in m.values():
        for key in ("reward/mean", "accuracy", "response_length/mean", "selected/sequences", "selected/tokens",
                    "time/rollout", "time/sync", "time/reward", "time/logprob", "time/update", "time/step",
                    "mismatch/logprob_abs_diff_max", "loss", "grad_norm", "lr", "sync/bytes"):
            assert key in record, key
        assert record["mismatch/logprob_abs_diff_max"] < 1e-3     # engine and learner agree (fp32, same T)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    for key in ("accuracy_before", "accuracy_after", "mean_length_before", "mean_length_after", "time_per_step"):
        assert summary[key] is not None
    assert open(os.path.join(run_dir, "ckpt", "latest")).read().strip() == "iter_0000003"
    assert os.path.isfile(os.path.join(run_dir, "plots", "accuracy.png"))
    if algo == "bppo":
        full, kept = (sum(r[k] for r in m.values()) for k in ("selected/full_response_tokens", "selected/tokens"))
        assert kept < full                                      # the prefix cut removed tokens


def test_sigkill_mid_checkpoint_and_between_steps_then_resume(runs, tiny_qwen2, tmp_path):
    """Kill -9 while step 2's checkpoint is being written, restart (resumes from step 1), kill -9 between steps
    2 and 3, restart: the resumed steps' metrics equal the uninterrupted run's."""
    run_dir = str(tmp_path / "killed")
    ckpt = os.path.join(run_dir, "ckpt")
    overrides = ("algorithm.name=bppo", "checkpoint.save_interval=1", *BPPO_LAYOUT)

    def launch():
        return subprocess.Popen(train_cmd(tiny_qwen2, run_dir, *overrides), cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    proc = launch()
    assert wait_for(lambda: os.path.isdir(os.path.join(ckpt, ".tmp-iter_0000002")), proc), "no step-2 write seen"
    kill(proc)
    latest = open(os.path.join(ckpt, "latest")).read().strip()
    assert latest == "iter_0000001", f"a partial checkpoint was taken as latest: {latest}"
    proc = launch()
    assert wait_for(lambda: open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000002", proc)
    kill(proc)
    train(tiny_qwen2, run_dir, *overrides)
    reference, resumed = metrics(runs["bppo"]), metrics(run_dir)
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        for key in ("reward/mean", "accuracy", "selected/sequences", "selected/tokens", "loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_stop_signal_saves_and_exits_with_distinct_code(tiny_qwen2, tmp_path, nproc, sig):
    """One process gets the signal (at 2 ranks: rank 1 only, as a Slurm --signal may reach ranks at different
    times); all ranks agree to stop, save, and exit with 75. torchrun reports a worker exit code as its own
    failure, so at 2 ranks the 75 is read from its report."""
    import psutil

    run_dir = str(tmp_path / "stopped")
    proc = subprocess.Popen(train_cmd(tiny_qwen2, run_dir, "train.steps=50", "checkpoint.save_interval=0",
                                      nproc=nproc), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
                     and len(metrics(run_dir)) >= 1, proc)
    if nproc == 1:
        os.kill(proc.pid, sig)
    else:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "megatron_bppo.cli" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(max(workers, key=lambda p: p.pid).pid, sig)
    out, _ = proc.communicate(timeout=300)
    if nproc == 1:
        assert proc.returncode == 75, out[-3000:]
    else:
        assert "exitcode  : 75" in out, out[-3000:]
    saved = open(os.path.join(run_dir, "ckpt", "latest")).read().strip()
    assert saved.startswith("iter_") and int(saved[5:]) >= 1
    assert "stop signal: state saved" in out


def test_uniform_groups_skip_the_update_and_the_run_continues(tiny_qwen2, tmp_path):
    """The real arithmetic reward on a random model: every group is all-wrong, so there is nothing to train."""
    run_dir = str(tmp_path / "uniform")
    proc = train(tiny_qwen2, run_dir, "reward.name=gsm8k", "train.steps=2", nproc=1)
    m = metrics(run_dir)
    assert sorted(m) == [1, 2] and all(r["skipped/no_update_set"] == 1 for r in m.values())
    assert "update skipped" in proc.stderr
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))


def test_non_finite_loss_skips_the_optimizer_step(tiny_qwen2):
    out = run_procs(["tests/workers/platform_probe.py", tiny_qwen2, "nan"])
    assert "PROBE OK" in out.stdout


@pytest.mark.parametrize("case", ["missing_dataset", "empty_dataset", "wrong_columns", "bad_model_dir",
                                  "prompt_too_long", "world_size", "unknown_reward"])
def test_bad_inputs_fail_before_any_work(case, tiny_qwen2, tmp_path):
    data = tmp_path / "data.jsonl"
    overrides, message = {
        "missing_dataset": ([f"data.train={tmp_path}/none.jsonl", "data.eval=x"], "does not exist"),
        "empty_dataset": ([f"data.train={data}", f"data.eval={data}"], "empty"),
        "wrong_columns": ([f"data.train={data}", f"data.eval={data}"], "columns"),
        "bad_model_dir": ([f"model.path={tmp_path}/nomodel"], "is not a directory"),
        "prompt_too_long": (["rollout.max_model_len=40", "sampling.max_tokens=30"], "max_prompt_tokens=10"),
        "world_size": (["parallel.tp=2"], "world size 1 is not divisible"),
        "unknown_reward": (["reward.name=no_such_reward"], "no_such_reward"),
    }[case]
    data.write_text("" if case == "empty_dataset" else '{"foo": 1, "bar": 2}\n' * 3)
    cmd = train_cmd(tiny_qwen2, str(tmp_path / "run"), *overrides, nproc=1)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "configuration error" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
