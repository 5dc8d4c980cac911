"""The real sbatch scripts (slurm/train.sbatch, slurm/convert.sbatch, slurm/eval.sbatch) on a real Slurm cluster:
two fake nodes on this machine, started by slurm/local_cluster.sh (munged + slurmctld + one slurmd per node). A 2-node x 2-rank
tiny BPPO run; a run that is signalled (SIGUSR1 to the batch shell, as --signal=B:USR1@900 does before the time
limit), saves, requeues itself and resumes with the same per-step metrics as the uninterrupted run; a bad config
that fails fast with the error in the job's log; a 2-node checkpoint conversion round trip and evaluation.

Jobs are polled with `scontrol show job -o` (sbatch --wait backs off to 32 s polls)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
CONFIG = "examples/configs/tiny_bppo.yaml"
CLUSTER_ENV = {"LOCAL_SLURM_NODES": "2", "LOCAL_SLURM_CPUS": "4"}
# the #SBATCH defaults are for 8-GPU nodes; the local nodes have no GPUs and 4 CPU slots each
SHAPE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def _cluster(cmd, check=True):
    proc = subprocess.run(["bash", CLUSTER, cmd], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **CLUSTER_ENV})
    if check and proc.returncode:
        raise AssertionError(f"local_cluster.sh {cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cluster():
    """Start the local cluster once for this module (installing Slurm from Debian packages if needed) and stop it
    at the end, unless it was already running."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        proc = _cluster("install", check=False)
        if proc.returncode:
            message = f"Slurm is not installed and could not be installed here:\n{proc.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    was_up = _cluster("status", check=False).returncode == 0
    _cluster("start")
    yield
    if not was_up:
        _cluster("stop", check=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


def job_env(work):
    return {**os.environ, "PYTHON": sys.executable, "LOG_ROOT": str(work / "logs"), "MEGATRON_BPPO_CPU": "1",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# 15 min jobs: train.sbatch's default USR1 900 s before the limit would fire at once; 60 s is enough for the tiny run
SHORT_JOB = ("--time=15", "--signal=B:USR1@60")


def submit(work, name, script, *args, sbatch_args=()):
    proc = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={work}/{name}-%j.out",
                           *sbatch_args, script, *args], cwd=ROOT, env=job_env(work), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job_id):
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def job_output(work, name, job_id):
    path = os.path.join(work, f"{name}-{job_id}.out")
    return open(path).read() if os.path.exists(path) else f"(no {path})"


def log_dir(work, name, job_id):
    return os.path.join(work, "logs", f"{name}-{job_id}")


def wait_job(work, name, job_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job_info(job_id).get('JobState')} after {timeout} s:\n"
                         f"{job_output(work, name, job_id)}")


def train_args(tiny_qwen2, run_dir, *overrides):
    return [CONFIG, f"model.path={tiny_qwen2}", "reward.name=megatron_bppo.testing.rewards:even_length",
            f"run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", "checkpoint.save_interval=1", *overrides]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "loss" in r or "skipped/no_update_set" in r}


def read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def two_node_run(cluster, work, tiny_qwen2):
    """The uninterrupted 2-node x 2-rank run (also the reference for the preemption test)."""
    run_dir = str(work / "run_ref")
    start = time.time()
    job = submit(work, "ref", "slurm/train.sbatch", *train_args(tiny_qwen2, run_dir), sbatch_args=[*SHAPE, *SHORT_JOB])
    info = wait_job(work, "ref", job)
    return {"job": job, "run_dir": run_dir, "info": info, "seconds": time.time() - start,
            "output": job_output(work, "ref", job), "logs": log_dir(work, "ref", job)}


def test_two_node_two_rank_run_completes_with_metrics(two_node_run):
    run = two_node_run
    assert (run["info"]["JobState"], run["info"]["ExitCode"]) == ("COMPLETED", "0:0"), run["output"]
    assert "2 node(s) [node[1-2]] x 2 task(s) = 4 ranks" in run["output"]
    # one process per rank, two per node, ranks 0-1 on node1 and 2-3 on node2 (srun's block distribution)
    for rank in range(4):
        log = read(os.path.join(run["logs"], f"attempt0-rank{rank}.log"))
        assert f"rank {rank} of 4 on node{rank // 2 + 1} (local rank {rank % 2})" in log
    rank0 = read(os.path.join(run["logs"], "attempt0-rank0.log"))
    assert "world 4 (TP1 PP1)" in rank0
    m = metrics(run["run_dir"])
    assert sorted(m) == [1, 2, 3]
    for record in m.values():
        for key in ("reward/mean", "accuracy", "selected/tokens", "loss", "grad_norm", "time/step"):
            assert key in record, key
    assert os.path.isfile(os.path.join(run["run_dir"], "summary.json"))
    assert read(os.path.join(run["run_dir"], "ckpt", "latest")).strip() == "iter_0000003"
    print(f"2-node x 2-rank tiny run: {run['seconds']:.0f} s from sbatch to COMPLETED")


@pytest.mark.parametrize("case", ["unknown_key", "layout"])
def test_bad_config_fails_fast_with_the_error_in_the_log(cluster, work, tiny_qwen2, case):
    """unknown_key: caught by the script's check before any rank starts. layout: TP3 on 4 ranks, caught by every
    rank at start-up; rank 0 prints it and --kill-on-bad-exit ends the step (no rank waits in a collective)."""
    override, expected = {
        "unknown_key": ("algorithm.nmae=bppo", ["configuration error, no rank started",
                                                "unknown config key 'algorithm.nmae' (did you mean 'name'?)"]),
        "layout": ("parallel.tp=3", ["training stopped on a configuration error",
                                     "world size 4 is not divisible by parallel.tp*parallel.pp = 3*1"]),
    }[case]
    name = f"bad-{case}"
    start = time.time()
    job = submit(work, name, "slurm/train.sbatch", *train_args(tiny_qwen2, str(work / name), override),
                 sbatch_args=[*SHAPE, *SHORT_JOB])
    info = wait_job(work, name, job, timeout=180)
    seconds = time.time() - start
    out = job_output(work, name, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, out)
    assert info.get("Restarts") == "0"                                     # a failure is not requeued
    for text in expected:
        assert text in out, out
    assert seconds < 120, f"a bad config took {seconds:.0f} s to fail"
    assert not os.path.exists(work / name / "metrics.jsonl")
    print(f"bad config ({case}): FAILED after {seconds:.0f} s")


def test_signalled_job_saves_requeues_and_resumes_with_the_same_metrics(two_node_run, work, tiny_qwen2):
    """SIGUSR1 to the batch shell once step 1 is logged (what --signal=B:USR1@900 does before the time limit):
    the script forwards it to the ranks, they save and exit 75, the script requeues the job, the second run
    resumes from the checkpoint and finishes; every step's metrics equal the uninterrupted run's."""
    assert two_node_run["info"]["JobState"] == "COMPLETED", two_node_run["output"]
    run_dir = str(work / "run_pre")
    job = submit(work, "pre", "slurm/train.sbatch", *train_args(tiny_qwen2, run_dir), sbatch_args=[*SHAPE, *SHORT_JOB])
    start = time.time()
    def step_one_logged():
        try:
            return 1 in metrics(run_dir)
        except (OSError, ValueError):           # not there yet, or a line half written
            return False

    while not step_one_logged():
        state = job_info(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (state, job_output(work, "pre", job))
        assert time.time() - start < 480, "step 1 never logged"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_job(work, "pre", job, timeout=600)
    out = job_output(work, "pre", job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, out)
    assert "SIGUSR1: asking every rank to save and stop" in out
    assert "ranks saved and stopped on a signal: exit 75" in out
    assert f"requeueing job {job} (restart 1)" in out and "attempt 1:" in out, out

    logs = log_dir(work, "pre", job)
    first, second = (read(os.path.join(logs, f"attempt{i}-rank0.log")) for i in (0, 1))
    saved = re.search(r"stop signal: state saved at step (\d+)", first)
    assert saved, first[-3000:]
    step = int(saved.group(1))
    assert 1 <= step < 3
    assert f"resumed from {run_dir}/ckpt/iter_{step:07d} at step {step}" in second, second[-3000:]
    # the resumed run did only the remaining steps
    assert re.findall(r"^step (\d)/3", second, re.M) == [str(s) for s in range(step + 1, 4)]

    reference, resumed = metrics(two_node_run["run_dir"]), metrics(run_dir)
    assert sorted(resumed) == [1, 2, 3]
    for s in (1, 2, 3):
        for key in ("reward/mean", "accuracy", "selected/sequences", "selected/tokens", "loss", "grad_norm"):
            assert resumed[s][key] == pytest.approx(reference[s][key], rel=1e-5, abs=1e-7), (s, key)
    print(f"preempted at step {step}, requeued and resumed: {time.time() - start:.0f} s after submission")


def test_convert_round_trip_and_eval_across_two_nodes(cluster, work, tiny_qwen2):
    """hf-to-mcore at TP2 and mcore-to-hf at PP2, each as 2 ranks on 2 nodes; the export is bit-exact. The TP2
    checkpoint evaluated by slurm/eval.sbatch at PP2 on 2 nodes (one engine replica per rank) gives the records
    of the HF directory evaluated by one local process."""
    from safetensors.torch import load_file

    mcore, back, evaluated, local = (str(work / n) for n in ("mcore", "hf_back", "eval_2nodes", "eval_local"))
    shape = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    first = submit(work, "to-mcore", "slurm/convert.sbatch", "hf-to-mcore", "--hf-dir", tiny_qwen2,
                   "--out-dir", mcore, "--tp", "2", sbatch_args=shape)
    second = submit(work, "to-hf", "slurm/convert.sbatch", "mcore-to-hf", "--ckpt-dir", mcore, "--out-dir", back,
                    "--pp", "2", sbatch_args=[*shape, f"--dependency=afterok:{first}"])
    eval_args = ["--data", "arithmetic:l0", "--limit", "4", "--samples", "2", "sampling.max_tokens=8",
                 "rollout.backend=hf", "reward.name=megatron_bppo.testing.rewards:even_length"]
    third = submit(work, "eval", "slurm/eval.sbatch", "--model", mcore, "--out", evaluated, *eval_args,
                   "parallel.pp=2", sbatch_args=[*shape, f"--dependency=afterok:{first}"])
    subprocess.run([sys.executable, "-m", "megatron_bppo.cli", "eval", "--model", tiny_qwen2, "--out", local,
                    *eval_args], check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name, job in (("to-mcore", first), ("to-hf", second), ("eval", third)):
        info = wait_job(work, name, job, timeout=300)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_output(work, name, job)
    assert "2 node(s) [node[1-2]] = 2 ranks" in job_output(work, "to-hf", second)
    assert "evaluation done" in job_output(work, "eval", third)
    with open(os.path.join(evaluated, "problems.jsonl")) as a, open(os.path.join(local, "problems.jsonl")) as b:
        assert a.read() == b.read()
    original = {}
    for f in os.listdir(tiny_qwen2):
        if f.endswith(".safetensors"):
            original.update(load_file(os.path.join(tiny_qwen2, f)))
    converted = {}
    for f in os.listdir(back):
        if f.endswith(".safetensors"):
            converted.update(load_file(os.path.join(back, f)))
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
