"""Long runs that never lose work or silently restart (issue 15, items 1, 2, 4, 5 and the checkpoint lock):
incomplete-only checkpoint directories refuse a fresh start, rotation never counts or removes incomplete
checkpoints, a changed train set refuses a resume, truncated safetensors and missing converter inputs are one
message and exit 2, and a checkpoint directory held by a live run is refused on every rank.

All but the last test are CPU-light (fake checkpoint directories, small files, one-process subprocesses). The last
one runs the real trainer at 2 ranks through those cases (`-m slow`)."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, free_port, torchrun_command
from megatron_bppo.checkpointing import META, latest_checkpoint, resume_checkpoint, rotate_checkpoints
from megatron_bppo.run_lock import LOCK, check_checkpoint_lock, take_checkpoint_lock
from megatron_bppo.config import CheckpointConfig, ConfigError, OptimConfig
from megatron_bppo.data import PromptSampler, prompts_fingerprint

TOOL = "tools/convert_checkpoint.py"


def fake_checkpoint(root, step, sampler_state=None, complete=True, scheduler=None):
    """A checkpoint directory with the files resume looks at (no tensors); without META when not complete."""
    path = os.path.join(root, f"iter_{step:07d}")
    os.makedirs(path)
    for name in (".metadata", "common.pt"):                 # common.pt: megatron-core < 0.19 writes one
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"not read by these tests")
    torch.save({"step": step, "scheduler": scheduler, "extra": {"sampler": sampler_state} if sampler_state else {}},
               os.path.join(path, "trainer_state.pt"))
    if complete:
        with open(os.path.join(path, META), "w") as f:
            json.dump({"step": step, "has_optimizer": True, "world_size": 2, "layout": {}}, f)
    return path


def point_latest(root, step):
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"iter_{step:07d}")


def resumes_from(ckpt_dir, sampler, optim=OptimConfig(), **ckpt):
    """What trainer.setup decides before it builds anything: the checkpoint to load, or None (a fresh start)."""
    return resume_checkpoint(CheckpointConfig(dir=str(ckpt_dir), **ckpt), sampler.state_dict(), optim)


def prompts(refs, tokens=None):
    return [SimpleNamespace(token_ids=(tokens or [[1, 2, i] for i in range(len(refs))])[i],
                            example=SimpleNamespace(reference=r)) for i, r in enumerate(refs)]


# ------------------------------------------------------------------------- 1. incomplete checkpoints
def test_only_incomplete_checkpoints_refuse_a_fresh_start(tmp_path):
    """`latest` names a checkpoint without its completion marker (a full disk): resume must not start at step 0."""
    root = tmp_path / "ckpt"
    fake_checkpoint(str(root), 2, complete=False)
    point_latest(str(root), 2)
    with pytest.raises(ConfigError) as e:
        resumes_from(root, PromptSampler(4))
    msg = str(e.value)
    assert "checkpoint.allow_fresh_start=true" in msg and "iter_0000002" in msg and f"no {META}" in msg
    assert "latest: names 'iter_0000002', which is incomplete" in msg
    assert resumes_from(root, PromptSampler(4), allow_fresh_start=True) is None           # asked for: step 0
    assert os.path.isdir(root / "iter_0000002")                                          # and nothing removed


def test_empty_missing_or_interrupted_first_write_is_a_normal_fresh_start(tmp_path):
    assert resumes_from(tmp_path / "none", PromptSampler(4)) is None
    (tmp_path / "empty").mkdir()
    assert resumes_from(tmp_path / "empty", PromptSampler(4)) is None
    (tmp_path / "first" / ".tmp-iter_0000001").mkdir(parents=True)       # killed during its first save
    assert resumes_from(tmp_path / "first", PromptSampler(4)) is None


def test_a_truncated_marker_is_never_taken_as_latest(tmp_path):
    """After a full disk the marker may exist but be empty: the older complete checkpoint is the latest."""
    root = str(tmp_path)
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 3)
    open(os.path.join(newest, META), "w").close()
    point_latest(root, 3)
    assert latest_checkpoint(root) == os.path.join(root, "iter_0000002")
    sampler = PromptSampler(4)
    assert resumes_from(root, sampler) == os.path.join(root, "iter_0000002")


def test_rotation_counts_and_removes_only_complete_checkpoints(tmp_path, caplog):
    """keep_last (rotate_checkpoints, called by save_checkpoint on rank 0 after each save): an older incomplete
    checkpoint is neither counted nor removed, and is named in a warning; the one just written always stays."""
    root = str(tmp_path)
    fake_checkpoint(root, 1, complete=False)
    with caplog.at_level(logging.WARNING, logger="megatron_bppo.checkpointing"):
        for step in (2, 3, 4):
            fake_checkpoint(root, step)
            rotate_checkpoints(root, keep_last=2, keep=f"iter_{step:07d}")
    assert sorted(d for d in os.listdir(root) if d.startswith("iter_")) == ["iter_0000001", "iter_0000003",
                                                                             "iter_0000004"]
    assert "iter_0000001" in caplog.text and "incomplete" in caplog.text


# ------------------------------------------------------------------------- 2. changed train data
def test_prompt_fingerprint_covers_token_ids_and_answers_and_is_saved():
    base = prompts(["1", "2", "3"])
    assert prompts_fingerprint(base) == prompts_fingerprint(prompts(["1", "2", "3"]))
    assert prompts_fingerprint(base) != prompts_fingerprint(prompts(["1", "2", "4"]))
    assert prompts_fingerprint(base) != prompts_fingerprint(prompts(["1", "2", "3"], [[1, 2, 0], [1, 2, 1], [9]]))
    fp = prompts_fingerprint(base)
    assert PromptSampler(3, seed=1, fingerprint=fp).state_dict()["fingerprint"] == fp
    assert PromptSampler(3).state_dict()["fingerprint"] is None          # built from a number: nothing to check


def test_resume_refuses_changed_train_prompts_of_the_same_size(tmp_path):
    """Same number of prompts, other content: the saved position would mean other prompts."""
    saved = PromptSampler(3, seed=0, fingerprint=prompts_fingerprint(prompts(["1", "2", "3"])))
    saved.next_indices(2)
    root = str(tmp_path)
    fake_checkpoint(root, 5, saved.state_dict())
    point_latest(root, 5)
    changed = PromptSampler(3, seed=0, fingerprint=prompts_fingerprint(prompts(["1", "2", "4"])))
    with pytest.raises(ConfigError, match="checkpoint.allow_data_change=true") as e:
        resumes_from(root, changed)
    assert "iter_0000005" in str(e.value)
    assert resumes_from(root, changed, allow_data_change=True) == os.path.join(root, "iter_0000005")
    same = PromptSampler(3, seed=0, fingerprint=prompts_fingerprint(prompts(["1", "2", "3"])))
    assert resumes_from(root, same) == os.path.join(root, "iter_0000005")
    with pytest.raises(ConfigError, match="3 train prompts, the data now gives 4"):      # the size check stays
        resumes_from(root, PromptSampler(4, fingerprint="x"), allow_data_change=True)


def test_resume_refuses_another_data_seed_unless_allowed(tmp_path, caplog):
    """A file's prompts are the same under any data.seed (same fingerprint), but the saved position is a place in
    the saved seed's order: another seed is refused, and allow_data_change continues in the saved order."""
    fp = prompts_fingerprint(prompts(["1", "2", "3", "4"]))
    saved = PromptSampler(4, seed=3, fingerprint=fp)
    first = saved.next_indices(2)
    root = str(tmp_path)
    fake_checkpoint(root, 4, saved.state_dict())
    point_latest(root, 4)
    with pytest.raises(ConfigError, match="data.seed=3 to resume") as e:
        resumes_from(root, PromptSampler(4, seed=5, fingerprint=fp))
    assert "this run sets data.seed=5" in str(e.value) and "checkpoint.allow_data_change=true" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="megatron_bppo.checkpointing"):
        assert resumes_from(root, PromptSampler(4, seed=5, fingerprint=fp), allow_data_change=True) is not None
    assert "data.seed=3) continues" in caplog.text
    resumed = PromptSampler(4, seed=5, fingerprint=fp)
    resumed.load_state_dict(saved.state_dict())            # what trainer.resume then does: the saved order
    assert sorted(first + resumed.next_indices(2)) == [0, 1, 2, 3]
    assert resumes_from(root, PromptSampler(4, seed=3, fingerprint=fp)) == os.path.join(root, "iter_0000004")


def test_resume_refuses_a_changed_lr_schedule_before_anything_loads(tmp_path):
    """megatron-core keeps a resumed optimizer's saved schedule (0.16.1 silently; 0.19.2 fails with a bare KeyError
    on a changed LR): refused at once, naming the keys, both values and the ways out."""
    trained = OptimConfig(lr=2e-5, warmup_steps=2, decay_steps=10, decay_style="linear")
    root = str(tmp_path)
    saved = {k: v for k, v in trained.lr_schedule().items() if k != "init_lr"}   # OptimizerParamScheduler.state_dict
    fake_checkpoint(root, 4, scheduler={**saved, "num_steps": 4})
    fake_checkpoint(str(tmp_path / "constant"), 4, scheduler={**OptimConfig(lr=2e-5).lr_schedule(), "num_steps": 4})
    point_latest(str(tmp_path / "constant"), 4)
    assert resumes_from(tmp_path / "constant", PromptSampler(4), OptimConfig(lr=2e-5, decay_steps=50)) is not None
    point_latest(root, 4)
    same = OptimConfig(lr=2e-5, warmup_steps=2, decay_steps=10, decay_style="linear", clip_grad=0.5)   # not in it
    assert resumes_from(root, PromptSampler(4), same) == os.path.join(root, "iter_0000004")
    with pytest.raises(ConfigError) as e:
        resumes_from(root, PromptSampler(4), OptimConfig(lr=1e-5, warmup_steps=2, decay_steps=20,
                                                         decay_style="linear"))
    message = str(e.value)
    assert "iter_0000004" in message and "optim.lr: 2e-05 in the checkpoint, 1e-05 in this run" in message
    assert "optim.decay_steps (with optim.warmup_steps): 10 in the checkpoint, 20 in this run" in message
    assert "optim.weight_decay" not in message and "tools/convert_checkpoint.py mcore-to-hf" in message
    with pytest.raises(ConfigError, match="optim.weight_decay: 0.0 in the checkpoint, 0.1 in this run"):
        resumes_from(root, PromptSampler(4), OptimConfig(lr=2e-5, warmup_steps=2, decay_steps=10,
                                                         decay_style="linear", weight_decay=0.1))


def test_a_checkpoint_of_the_gpu_stack_is_refused_by_an_older_megatron_core_with_the_reason(tmp_path, monkeypatch):
    """megatron-core >= 0.19 keeps the common state inside the torch_dist files (no common.pt); 0.16.1 (the CPU
    stack) reads only common.pt and would fail with "Common file ... does not exist"."""
    from megatron_bppo import checkpointing

    gpu = fake_checkpoint(str(tmp_path / "gpu"), 3)
    os.remove(os.path.join(gpu, "common.pt"))
    cpu = fake_checkpoint(str(tmp_path / "cpu"), 3)
    monkeypatch.setattr(checkpointing, "megatron_core_version", lambda: "0.16.1")
    point_latest(str(tmp_path / "gpu"), 3)
    with pytest.raises(ConfigError, match="installed megatron-core 0.16.1 reads only common.pt"):
        resumes_from(tmp_path / "gpu", PromptSampler(4))              # refused before anything is built
    checkpointing.check_readable(cpu, {"megatron_core": "0.16.1"})
    with pytest.raises(ConfigError) as e:
        checkpointing.check_readable(gpu, {"megatron_core": "0.19.2"})
    assert all(s in str(e.value) for s in ("megatron-core 0.19.2", "installed megatron-core 0.16.1", "mcore-to-hf"))
    with pytest.raises(ConfigError, match=r"megatron-core >= 0.19 \(not recorded\)"):
        checkpointing.check_readable(gpu, {})
    monkeypatch.setattr(checkpointing, "megatron_core_version", lambda: "0.19.2")
    checkpointing.check_readable(gpu, {"megatron_core": "0.19.2"})       # reads both layouts
    checkpointing.check_readable(cpu, {"megatron_core": "0.16.1"})


# ------------------------------------------------------------------------- 4. truncated safetensors
def small_hf_dir(path, truncate=0):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "num_hidden_layers": 2,
                                                  "intermediate_size": 128, "vocab_size": 256}))
    weights = path / "model.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(8, 8)}, str(weights))
    if truncate:
        os.truncate(weights, os.path.getsize(weights) - truncate)
    return str(path), str(weights)


def test_truncated_or_missing_safetensors_is_a_config_error_naming_the_file(tmp_path):
    from megatron_bppo.model.bridge import read_hf_config

    good, _ = small_hf_dir(tmp_path / "good")
    assert read_hf_config(good).model_type == "qwen2"
    bad, weights = small_hf_dir(tmp_path / "bad", truncate=100)
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        read_hf_config(bad)
    assert weights in str(e.value)
    (tmp_path / "good" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "c": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors"):
        read_hf_config(good)


# ------------------------------------------------------------------------- 4 + 5. the converter's bad inputs
@pytest.mark.parametrize("case", ["missing_hf_dir", "missing_ckpt_dir", "truncated_weights"])
def test_converter_bad_inputs_are_one_message_naming_the_flag(case, tmp_path):
    if case == "missing_hf_dir":
        args, expected = ["hf-to-mcore", "--hf-dir", str(tmp_path / "nope")], f"--hf-dir '{tmp_path / 'nope'}'"
    elif case == "missing_ckpt_dir":
        args, expected = ["mcore-to-hf", "--ckpt-dir", str(tmp_path / "nope")], f"--ckpt-dir '{tmp_path / 'nope'}'"
    else:
        hf, weights = small_hf_dir(tmp_path / "hf", truncate=10)
        args, expected = ["hf-to-mcore", "--hf-dir", hf], weights
    proc = subprocess.run([sys.executable, TOOL, *args, "--out-dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "convert_checkpoint: error:" in line]
    assert len(errors) == 1 and expected in errors[0] and "model.path" not in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- 6. the checkpoint-directory lock
def owner_lock(root, pid, host=None, start_time=None, **extra):
    """A lock file as another launch's rank 0 writes it."""
    import psutil

    os.makedirs(root, exist_ok=True)
    if start_time is None:
        start_time = psutil.Process(pid).create_time()
    info = {"host": host or socket.gethostname(), "pid": pid, "start_time": start_time, "started": "earlier",
            "launch": "another launch", "slurm_job_id": "", "slurm_restart_count": "", **extra}
    with open(os.path.join(root, LOCK), "w") as f:
        json.dump(info, f)


def lock_owner(root):
    with open(os.path.join(root, LOCK)) as f:
        return json.load(f)


def torchrun_env(rank, port="29999"):
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_owner_is_refused_on_every_rank_unless_broken(tmp_path, live_process):
    root = str(tmp_path / "ckpt")
    owner_lock(root, live_process.pid)
    for rank in (0, 1):
        for judge in (check_checkpoint_lock, take_checkpoint_lock):
            with pytest.raises(ConfigError) as e:
                judge(root, rank=rank, env=torchrun_env(rank))
            msg = str(e.value)
            assert f"pid {live_process.pid}" in msg and socket.gethostname() in msg
            assert "checkpoint.break_lock=true" in msg
    check_checkpoint_lock(root, rank=0, env=torchrun_env(0), break_lock=True)     # read-only: no change
    assert lock_owner(root)["pid"] == live_process.pid                          # refused: untouched
    lock = take_checkpoint_lock(root, rank=0, env=torchrun_env(0), break_lock=True)
    assert lock_owner(root)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(root, LOCK))


def test_a_dead_or_replaced_owner_on_this_host_is_taken_over(tmp_path):
    root = str(tmp_path / "ckpt")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner_lock(root, gone.pid, start_time=1.0)
    lock = take_checkpoint_lock(root, rank=0, env={})
    assert lock_owner(root)["pid"] == os.getpid()
    lock.release()
    owner_lock(root, os.getppid(), start_time=12345.0)       # that pid lives, but is another process than recorded
    lock = take_checkpoint_lock(root, rank=0, env={})
    assert lock_owner(root)["pid"] == os.getpid()
    lock.release()


def test_another_hosts_owner_is_refused_except_an_earlier_attempt_of_the_same_slurm_job(tmp_path):
    root = str(tmp_path / "ckpt")
    owner_lock(root, 4242, host="node-elsewhere", start_time=1.0, slurm_job_id="77", slurm_restart_count="0")
    with pytest.raises(ConfigError, match="node-elsewhere.*checkpoint.break_lock=true"):
        take_checkpoint_lock(root, rank=0, env={})
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    lock = take_checkpoint_lock(root, rank=0, env=slurm)        # requeued: that attempt has ended
    assert lock_owner(root)["pid"] == os.getpid() and lock_owner(root)["slurm_restart_count"] == "1"
    lock.release()


def test_other_ranks_wait_for_rank0_and_never_write(tmp_path):
    root = str(tmp_path / "ckpt")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        r=take_checkpoint_lock(root, rank=1, env=torchrun_env(1), wait_s=60)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not os.path.exists(os.path.join(root, LOCK))   # rank 1 does not write
    lock = take_checkpoint_lock(root, rank=0, env=torchrun_env(0))
    waiter.join(30)
    assert not waiter.is_alive() and result["r"] is None
    lock.release()
    with pytest.raises(ConfigError, match="rank 0 did not lock"):               # rank 0 never came: no hang
        take_checkpoint_lock(root, rank=1, env=torchrun_env(1), wait_s=0.5)


def test_a_rank_off_rank0s_host_refuses_only_when_rank0_must_too(tmp_path, live_process):
    """Node 1 of a 2-node torchrun: a live owner on its own host is on another host for rank 0 (refused there as
    well); a dead one there may still be rank 0's to take over, so it waits for rank 0's verdict."""
    root = str(tmp_path / "ckpt")
    node1 = {**torchrun_env(1), "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "node0"}
    owner_lock(root, live_process.pid)
    with pytest.raises(ConfigError, match=f"live run: pid {live_process.pid}"):
        take_checkpoint_lock(root, rank=1, env=node1, wait_s=5)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner_lock(root, gone.pid, start_time=1.0)
    with pytest.raises(ConfigError, match="rank 0 did not lock"):
        take_checkpoint_lock(root, rank=1, env=node1, wait_s=0.5)


def test_lock_is_held_while_its_run_lives_and_released_at_normal_exit(tmp_path):
    root = str(tmp_path / "ckpt")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from megatron_bppo.run_lock import take_checkpoint_lock; "
        "take_checkpoint_lock(sys.argv[1], env={}); print('locked', flush=True); sys.stdin.readline()"), root],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"live run: pid {holder.pid}"):
        take_checkpoint_lock(root, rank=0, env={})
    holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not os.path.exists(os.path.join(root, LOCK))


# ------------------------------------------------------------------------- end to end, 2 ranks (slow)
def _train(hf, run_dir, *overrides, timeout=900):
    cmd = [*torchrun_command(2), "-m", "megatron_bppo.cli", "train", "--config", "examples/configs/tiny_bppo.yaml",
           f"model.path={hf}", f"run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt",
           "reward.name=megatron_bppo.testing.rewards:even_length", "eval.at_start=false",
           "checkpoint.save_interval=1", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                               "MASTER_PORT": str(free_port())})
    return proc, proc.stdout + proc.stderr, time.time() - start


@pytest.mark.slow
def test_trainer_refuses_incomplete_locked_and_changed_data_then_resumes_when_allowed(tiny_qwen2, tmp_path,
                                                                                      live_process):
    """The real trainer at 2 ranks (torchrun): every refusal ends both ranks with exit 2 before any model is
    built (no rank left waiting), and nothing in the checkpoint directory is lost."""
    run_dir = str(tmp_path / "run")
    ckpt = os.path.join(run_dir, "ckpt")
    proc, out, _ = _train(tiny_qwen2, run_dir, "train.steps=1")
    assert proc.returncode == 0, out[-5000:]
    assert os.path.isfile(os.path.join(ckpt, "iter_0000001", META)) and not os.path.exists(os.path.join(ckpt, LOCK))
    assert "Overwriting old incomplete" not in out        # megatron-core's false alarm on a non-empty save dir

    marker = os.path.join(ckpt, "iter_0000001", META)                  # 1. the only checkpoint lost its marker
    os.rename(marker, marker + ".away")
    proc, out, took = _train(tiny_qwen2, run_dir, "train.steps=2", timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in out, out[-5000:]
    assert "configuration error" in out and "checkpoint.allow_fresh_start=true" in out and "iter_0000001" in out
    assert os.path.isdir(os.path.join(ckpt, "iter_0000001")) and "resumed from" not in out
    os.rename(marker + ".away", marker)

    owner_lock(ckpt, live_process.pid)                                 # 6. a live run holds the directory
    proc, out, took = _train(tiny_qwen2, run_dir, "train.steps=2", timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in out and "checkpoint.break_lock=true" in out, out[-5000:]
    assert took < 240 and lock_owner(ckpt)["pid"] == live_process.pid           # refused at once, lock untouched
    live_process.kill()
    live_process.wait()

    # 2. same number of generated prompts, other problems (the dead owner's lock is no obstacle)
    proc, out, took = _train(tiny_qwen2, run_dir, "train.steps=2", "data.seed=7", timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in out, out[-5000:]
    assert "checkpoint.allow_data_change=true" in out and "iter_0000001" in out
    assert "the train prompts changed since it was written" in out and "this run sets data.seed" not in out
    proc, out, _ = _train(tiny_qwen2, run_dir, "train.steps=2", "data.seed=7", "checkpoint.allow_data_change=true")
    assert proc.returncode == 0, out[-5000:]
    assert f"resumed from {ckpt}/iter_0000001 at step 1" in out and "the train prompts changed" in out
    assert "taking over its lock" in out
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000002"
    assert not os.path.exists(os.path.join(ckpt, LOCK))
