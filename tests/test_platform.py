"""The CPU workarounds: each one is still needed (leaving it out breaks a real megatron-core path with the
error it documents) and still sufficient (with all of them the paths run; see also test_learner_parity)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ROOT, run_procs
from megatron_bppo.platform import cpu_compat

PROBE = "tests/workers/platform_probe.py"
CUDA = "Torch not compiled with CUDA enabled"
# workaround -> (probe, world size, text expected in the failure, file expected in the traceback)
NEEDED = {
    "current_device": ("train", 1, CUDA, "param_and_grad_buffer.py"),
    "tensor_type": ("train", 1, "torch.cuda.FloatTensor", "distrib_optimizer.py"),
    "cuda_rng": ("train", 1, CUDA, "random.py"),
    "device_literals": ("train", 1, CUDA, "megatron/core"),
    "synchronize": ("pp", 2, CUDA, "p2p_communication.py"),
    "tensor_cuda": ("ckpt", 1, CUDA, "distrib_optimizer.py"),
    "distopt_load_states": ("ckpt", 1, "KeyError: 'step'", "distrib_optimizer.py"),
    "distopt_step_copy": ("ckpt", 1, "PROBE FAILED: Adam step", "expected 2"),
}


def test_every_workaround_has_a_probe_and_documentation():
    names = [w.name for w in cpu_compat.WORKAROUNDS]
    assert sorted(names) == sorted(NEEDED)
    for w in cpu_compat.WORKAROUNDS:
        assert w.where and w.why and ".py" in w.where, w.name


@pytest.mark.parametrize("probe,world", [("train", 1), ("ckpt", 1), ("pp", 2)])
def test_probes_pass_with_all_workarounds(tiny_qwen2, probe, world):
    out = run_procs([PROBE, tiny_qwen2, probe], nproc=world)
    assert "PROBE OK" in out.stdout


@pytest.mark.parametrize("name", list(NEEDED))
def test_workaround_is_still_needed(tiny_qwen2, name):
    probe, world, message, where = NEEDED[name]
    out = run_procs([PROBE, tiny_qwen2, probe], nproc=world, env={"MEGATRON_BPPO_CPU_SKIP": name}, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "PROBE OK" not in out.stdout, \
        f"megatron-core no longer needs the {name!r} workaround: remove it from platform/cpu_compat.py"
    assert message in text and where in text, text[-3000:]


def test_on_cuda_only_the_torch_adam_fixes_are_installed(monkeypatch):
    """megatron-core's DistributedOptimizer load path for torch's Adam is the same on a GPU without TE / Apex: those
    two fixes are installed there too (they leave any other optimizer to megatron-core); the CUDA ones are not."""
    installed = []
    monkeypatch.setattr(cpu_compat, "WORKAROUNDS", [dataclasses.replace(w, install=lambda n=w.name: installed.append(n))
                                                    for w in cpu_compat.WORKAROUNDS])
    monkeypatch.setattr(cpu_compat, "_APPLIED", [])
    monkeypatch.delenv("MEGATRON_BPPO_CPU_SKIP", raising=False)
    monkeypatch.setattr(cpu_compat.torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply() == installed == ["distopt_load_states", "distopt_step_copy"]


def test_unknown_skip_name_is_rejected(monkeypatch):
    monkeypatch.setenv("MEGATRON_BPPO_CPU_SKIP", "no_such_workaround")
    monkeypatch.setattr(cpu_compat, "_APPLIED", [])
    monkeypatch.setattr(cpu_compat.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown workarounds"):
        cpu_compat.apply()


# ---------------------------------------------------------------- the save without megatron-core's Manager
_SAVE_PROBE = r"""
import contextlib, json, os, sys, time
import psutil, torch, torch.distributed as dist
from megatron_bppo.platform import cpu_compat
cpu_compat.apply()
mode, out, init = sys.argv[1:4]
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + init)
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
weights = torch.arange(64.0).reshape(8, 8)
os.makedirs(out)
with cpu_compat.in_process_save_results_queue() if mode == "with" else contextlib.nullcontext():
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weights.clone(), replica_id=0)}, out)
helpers = [[p.pid, " ".join(p.cmdline())] for p in psutil.Process().children(recursive=True)]
loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8, 8), replica_id=0)}, out)
print("PROBE " + json.dumps({"helpers": helpers, "equal": bool(torch.equal(loaded["w"], weights))}), flush=True)
time.sleep(600)      # the test SIGKILLs this process, as a rank is killed
"""


def _save_probe(tmp_path, mode):
    """Run one synchronous torch_dist save of one tensor in a fresh process; SIGKILL it after the save.
    Returns (the helper processes it had after the save, whether it loaded back, those still alive 2 s after
    the kill). Every helper still alive at the end is killed."""
    args = [mode, str(tmp_path / mode), str(tmp_path / f"{mode}.init")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_PROBE, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    helpers, survivors = [], []
    watchdog = threading.Timer(300, proc.kill)          # a hung probe ends the readline below
    watchdog.start()
    try:
        line = proc.stdout.readline()
        if not line.startswith("PROBE "):
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"save probe failed:\n{line}{out}\n{err[-3000:]}")
        result = json.loads(line[len("PROBE "):])
        helpers = result["helpers"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)
        for pid, _ in helpers:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    survivors.append(pid)
            except psutil.NoSuchProcess:
                pass
        return helpers, result["equal"], survivors
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, _ in helpers:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_save_without_the_workaround_leaves_helpers_behind_a_killed_rank(tmp_path):
    """megatron-core 0.16.1 starts a multiprocessing Manager (+ resource tracker) for a synchronous save, and
    they outlive the SIGKILLed process that saved: what in_process_save_results_queue avoids."""
    helpers, equal, survivors = _save_probe(tmp_path, "without")
    assert equal
    assert any("multiprocessing" in cmd for _, cmd in helpers), (
        f"megatron-core no longer starts a multiprocessing helper for a synchronous save ({helpers}): "
        "remove in_process_save_results_queue from platform/cpu_compat.py and its use in checkpointing.py")
    assert survivors, f"the save's helpers {helpers} now end with the killed process: the workaround may go"


def test_save_with_the_workaround_starts_no_helper_and_loads_back(tmp_path):
    helpers, equal, survivors = _save_probe(tmp_path, "with")
    assert equal and helpers == [] and survivors == []
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with cpu_compat.in_process_save_results_queue():      # scoped: the module global is put back
        assert filesystem_async._results_queue is not None
    assert filesystem_async._results_queue is None
