"""Killed processes: a rank dies with its launcher, what a rank forks dies with the rank, and a run SIGKILLed
again and again (every process at once, as a node failure) resumes to the same result with nothing left behind.

Fast tests: lifetime.bind_to_launcher / die_with_parent on tiny process trees (no torchrun, no vLLM).
Slow tests (real 2-rank torchrun runs of the tiny model): torchrun alone killed, one rank alone killed, the drill.
Every process of a launch carries MEGATRON_BPPO_DRILL_MARK=<token> in its environment (inherited by torchrun's
workers and their helpers), so what survives a kill is found wherever it was reparented to.
"""
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from conftest import ROOT, wait_for

MARK = "MEGATRON_BPPO_DRILL_MARK"
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "drill"}   # what torchrun's workers see
needs_prctl = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


# ---------------------------------------------------------------------------------------------------- helpers
def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(pids, seconds: float) -> list[int]:
    """The pids of `pids` still alive after up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.05)


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Lines:
    """Lines of a child's stdout (stderr merged), read with a timeout."""

    def __init__(self, proc):
        self.proc, self.buffer, self.seen = proc, b"", []

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while True:
            for line in self.seen:
                if line.startswith(prefix):
                    return line
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"no line {prefix!r} within {timeout} s; output so far:\n" + "\n".join(self.seen))
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"output ended before {prefix!r}:\n" + "\n".join(self.seen))
                self.buffer += chunk
                *lines, self.buffer = self.buffer.split(b"\n")
                self.seen += [line.decode(errors="replace") for line in lines]

    def text(self) -> str:
        return "\n".join(self.seen)


def _python(code: str, *args, new_session=True):
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=new_session,
                            env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"})


# A stand-in for torchrun: starts the "rank" in a session of its own from its main thread, as torchrun does
# (elastic/multiprocessing/subprocess_handler/subprocess_handler.py: Popen(start_new_session=True)), then waits.
LAUNCHER = r"""
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
print("RANK_PID", rank.pid, flush=True)
time.sleep(600)
"""

# The "rank": binds itself as init_distributed does (lifetime.bind_to_launcher), with torchrun's environment.
RANK = r"""
import json, os, sys, time
from megatron_bppo import lifetime
env = json.loads(sys.argv[1])
print("IMPORTED", os.getppid(), flush=True)
go = sys.argv[2] if len(sys.argv) > 2 else ""
while go and not os.path.exists(go):
    time.sleep(0.02)
mechanism = lifetime.bind_to_launcher(env)
print("BOUND", mechanism, lifetime.parent_death_signal(), flush=True)
time.sleep(600)
"""


# ------------------------------------------------------------------------------------------- fast: the binding
def test_binding_only_under_a_known_launcher(monkeypatch):
    from megatron_bppo import lifetime

    monkeypatch.setattr(lifetime, "_BOUND", None)
    assert lifetime._launcher_of(TORCHRUN_ENV) == "torchrun"
    assert lifetime._launcher_of({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == "srun"
    assert lifetime._launcher_of({"RANK": "0", "WORLD_SIZE": "2"}) is None       # set by something else
    assert lifetime._launcher_of({}) is None                                       # plain python
    # not bound: nothing armed in this (pytest) process
    assert lifetime.bind_to_launcher({}) is None
    assert lifetime.bind_to_launcher({**TORCHRUN_ENV, lifetime.EXIT_WITH_LAUNCHER_ENV: "0"}) is None
    assert lifetime._BOUND is None


@needs_prctl
def test_rank_dies_with_its_killed_launcher():
    """kill -9 of the launcher: the rank (own session, so not in the launcher's process group) is gone in seconds."""
    launcher = _python(LAUNCHER, RANK, json.dumps(TORCHRUN_ENV))
    out = _Lines(launcher)
    rank = int(out.wait_for("RANK_PID").split()[1])
    try:
        assert out.wait_for("BOUND").split()[1:] == ["prctl", str(int(signal.SIGKILL))]
        assert psutil.Process(rank).ppid() == launcher.pid
        os.killpg(launcher.pid, signal.SIGKILL)          # the launcher's whole process group, as in the issue
        launcher.wait()
        assert not _gone_within([rank], 5), "the rank outlived its launcher"
    finally:
        _kill([rank])
        if launcher.poll() is None:
            launcher.kill()


@needs_prctl
def test_rank_whose_launcher_died_before_binding_exits(tmp_path):
    """The launcher dies between the rank's start and bind_to_launcher: the rank notices at once."""
    go = str(tmp_path / "go")
    launcher = _python(LAUNCHER, RANK, json.dumps(TORCHRUN_ENV), go)
    out = _Lines(launcher)
    rank = int(out.wait_for("RANK_PID").split()[1])
    try:
        out.wait_for("IMPORTED")
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 10
        while psutil.Process(rank).ppid() == launcher.pid and time.time() < deadline:
            time.sleep(0.02)                               # reparented: the launcher is gone
        open(go, "w").close()
        assert not _gone_within([rank], 10), "a rank whose launcher had died kept running"
        out.wait_for(f"megatron-bppo: its launcher (torchrun) (pid {launcher.pid}) is gone", timeout=5)
        assert "BOUND" not in out.text()
    finally:
        _kill([rank])


# The "rank" forks helpers three ways, then reports their pids and the death signal each one has.
FORKS = r"""
import json, multiprocessing, os, subprocess, sys, threading, time
from megatron_bppo import lifetime
lifetime.bind_to_launcher(json.loads(sys.argv[1]))
ctx = multiprocessing.get_context("fork")

def say(*parts):      # one write(2) per line: print() writes its parts separately, and three processes share the pipe
    os.write(1, (" ".join(map(str, parts)) + "\n").encode())

def report(tag):
    say(tag, os.getpid(), lifetime.parent_death_signal())
    time.sleep(600)

ctx.Process(target=report, args=("FORK_MAIN",)).start()    # from the main thread, as megatron's writers
thread = threading.Thread(target=lambda: ctx.Process(target=report, args=("FORK_THREAD",)).start())
thread.start()
thread.join()
spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])    # fork+exec, as "spawn"
say("SPAWNED", spawned.pid)
time.sleep(600)
"""


@needs_prctl
def test_what_a_rank_forks_from_its_main_thread_dies_with_it():
    """PR_SET_PDEATHSIG is not inherited across fork: the at-fork hook binds children forked from the rank's main
    thread (megatron-core's writer processes) to the rank. Forks from other threads, and fork+exec children
    (subprocess, multiprocessing "spawn" such as megatron-core's Manager) are not bound: they outlive a
    SIGKILLed rank, which is why checkpointing avoids that Manager (test_platform)."""
    rank = _python(FORKS, json.dumps(TORCHRUN_ENV))
    out = _Lines(rank)
    pids = []
    try:
        tag, pid, sig = out.wait_for("FORK_MAIN").split()
        pids.append(int(pid))
        assert sig == str(int(signal.SIGKILL))
        _, other, other_sig = out.wait_for("FORK_THREAD").split()
        spawned = int(out.wait_for("SPAWNED").split()[1])
        pids += [int(other), spawned]
        assert other_sig == "0"
        rank.kill()
        rank.wait()
        assert not _gone_within([int(pid)], 5), "a helper forked from the rank's main thread outlived the rank"
        assert _alive(int(other)) and _alive(spawned)      # documented limits (see the docstring)
    finally:
        _kill(pids)
        if rank.poll() is None:
            rank.kill()


# ------------------------------------------------------------------------------ slow: real 2-rank torchrun runs
def _trainer():
    import test_trainer

    return test_trainer


DRILL = ("algorithm.name=bppo", "checkpoint.save_interval=1")


def _overrides():
    return (*DRILL, *_trainer().BPPO_LAYOUT)


def marked(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries a launch marker that starts with `token` (markers end in "/")."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK, "").startswith(token):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def describe(procs) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            out.append(f"pid {p.pid} (gone)")
    return "\n".join(out)


def no_survivors(token: str, seconds: float) -> list[psutil.Process]:
    deadline = time.time() + seconds
    while True:
        left = marked(token)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.25)


def launch(hf, run_dir, token, log_path, *extra):
    env = {**_trainer().env(), MARK: token}
    with open(log_path, "w") as log:
        return subprocess.Popen(_trainer().train_cmd(hf, run_dir, *_overrides(), *extra), cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_everything(proc) -> list[int]:
    """SIGKILL every process of the launch at once, as a node failure would: freeze the whole tree (torchrun,
    its workers and all their descendants) with SIGSTOP until no new process appears, then SIGKILL them all."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        new = [p for p in tree if p.pid not in frozen]
        if not new:
            break
        for p in new:
            try:
                p.suspend()
                frozen[p.pid] = p
            except psutil.NoSuchProcess:
                pass
    for p in frozen.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    return sorted(frozen)


def latest_step(ckpt: str) -> int:
    from megatron_bppo.checkpointing import latest_checkpoint

    path = latest_checkpoint(ckpt)
    return int(os.path.basename(path)[5:]) if path else 0


def _tail(path, n=4000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _pointer(ckpt) -> str:
    try:
        with open(os.path.join(ckpt, "latest")) as f:
            return f.read().strip()
    except OSError:
        return ""


def _saved(ckpt, step):
    return lambda: _pointer(ckpt) == f"iter_{step:07d}"


@contextlib.contextmanager
def _saved_once(tiny_qwen2, tmp_path, name):
    """A 2-rank launch of a long run, handed over once its first checkpoint is saved; nothing of it survives."""
    run_dir, token = str(tmp_path / "run"), f"{name}-{uuid.uuid4().hex}/"
    proc = launch(tiny_qwen2, run_dir, token, tmp_path / "log.txt", "train.steps=20")
    try:
        assert wait_for(_saved(os.path.join(run_dir, "ckpt"), 1), proc), _tail(tmp_path / "log.txt")
        yield proc, token
    finally:
        _kill([p.pid for p in marked(token)])
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_killing_torchrun_alone_leaves_no_worker(tiny_qwen2, tmp_path):
    """kill -9 of torchrun's pid alone (its workers run in sessions of their own): every worker, and whatever it
    started, is gone within seconds."""
    with _saved_once(tiny_qwen2, tmp_path, "torchrun") as (proc, token):
        workers = [p for p in marked(token) if "megatron_bppo.cli" in " ".join(p.cmdline()) and p.ppid() == proc.pid]
        assert len(workers) == 2, describe(marked(token))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = no_survivors(token, 10)
        assert not left, "still running 10 s after torchrun was killed:\n" + describe(left)


@pytest.mark.slow
def test_killing_one_rank_leaves_no_helper(tiny_qwen2, tmp_path):
    """kill -9 of one rank after the first checkpoint: torchrun ends the other rank and exits; nothing of the
    launch is left (megatron-core's save would have left the killed rank's Manager + resource tracker running)."""
    with _saved_once(tiny_qwen2, tmp_path, "rank") as (proc, token):
        everything = marked(token)
        # megatron-core's Manager would be a "spawn" child (multiprocessing.spawn.spawn_main); a resource tracker
        # alone is harmless: it exits when the last process holding its pipe (its rank) exits, checked below
        managers = [p for p in everything if "spawn_main" in " ".join(p.cmdline())]
        assert not managers, "multiprocessing Manager processes next to the ranks after a save:\n" + describe(managers)
        rank1 = [p for p in psutil.Process(proc.pid).children() if _environ(p).get("RANK") == "1"]
        assert len(rank1) == 1, describe(everything)
        rank1[0].kill()
        proc.wait(timeout=180)                             # torchrun: SIGTERM to rank 0, SIGKILL after 30 s
        left = no_survivors(token, 15)
        assert not left, "still running after rank 1 was killed and torchrun exited:\n" + describe(left)


# ------------------------------------------------------------------------------------------------- the drill
KILLS = int(os.environ.get("KILL_DRILL_KILLS", "10"))
SEED = int(os.environ.get("KILL_DRILL_SEED", "15"))
STEPS = 3                                                  # tiny_bppo.yaml's train.steps
RESUMED = "[train] resumed from "
DETERMINISTIC = ("reward/mean", "accuracy", "selected/sequences", "selected/tokens", "loss", "grad_norm")


def _mtime(path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _logged_after(run_dir, step, since):
    def check():
        try:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if r.get("step") == step and r.get("timestamp", 0) >= since and \
                            ("loss" in r or "skipped/no_update_set" in r):
                        return True
        except OSError:
            pass
        return False
    return check


def _lock_taken(ckpt, proc):
    def check():
        try:
            with open(os.path.join(ckpt, "megatron_bppo.lock")) as f:
                pid = json.load(f).get("pid")
            return any(p.pid == pid for p in psutil.Process(proc.pid).children())     # rank 0's lock
        except (OSError, ValueError, psutil.Error):
            return False
    return check


def plan_kill(rng: random.Random, index: int, done: int):
    """(event, step, extra delay in s) for kill number `index`, of an attempt that resumes at step `done`: the
    first one before the first checkpoint, then none before it (the first save is awaited), then anywhere."""
    if done >= STEPS:                                      # training done: the kill lands in start-up / final eval
        return "lock", done, rng.uniform(0, 5)
    step = done + 1
    if index == 0:
        kinds = ["lock", "logged", "saving"]
    elif done == 0:
        kinds = ["saved"]
    else:
        kinds = ["lock", "logged", "saving", "saving", "saved", "saved"]
    kind = rng.choice(kinds)
    delay = {"lock": rng.uniform(0, 10), "logged": rng.uniform(0, 0.5), "saving": rng.uniform(0, 0.3),
             "saved": rng.uniform(0, 4)}[kind]
    return kind, step, delay


def _event(kind, step, run_dir, ckpt, proc, since):
    return {"lock": _lock_taken(ckpt, proc), "logged": _logged_after(run_dir, step, since),
            "saving": lambda: os.path.isdir(os.path.join(ckpt, f".tmp-iter_{step:07d}"))
            and _mtime(os.path.join(ckpt, f".tmp-iter_{step:07d}")) >= since,
            "saved": _saved(ckpt, step)}[kind]


def check_attempt_log(log: str, done: int, name: str):
    """An attempt that started with a complete checkpoint at step `done` >= 1 resumed from it, never from 0."""
    lines = log.splitlines()
    resumed = [line for line in lines if line.startswith(RESUMED)]
    assert "[eval before @ step 0]" not in log, f"{name} started again at step 0 after step {done} was saved"
    assert all(line.endswith(f"iter_{done:07d} at step {done}") for line in resumed), (name, resumed, done)
    progressed = [line for line in lines if line.startswith("step ") or line.startswith("[eval after")]
    if progressed:
        assert resumed, f"{name} trained or evaluated without resuming from step {done}: {progressed[:2]}"


@pytest.mark.slow
def test_kill_drill(tiny_qwen2, tmp_path):
    """A 2-rank BPPO run with a checkpoint every step, SIGKILLed (every process at once) KILLS times at seeded
    random moments -- start-up, mid-step, mid-checkpoint-write, between steps, final evaluation -- and restarted
    each time, ends with the same per-step metrics as an uninterrupted run. After every kill: `latest` names a
    complete checkpoint and never moves back, and no process of the killed attempt is left. Every attempt that
    started after the first save resumed from the latest checkpoint (never from step 0)."""
    trainer = _trainer()
    reference_dir = str(tmp_path / "reference")
    trainer.train(tiny_qwen2, reference_dir, *_overrides())
    reference = trainer.metrics(reference_dir)

    run_dir = str(tmp_path / "killed")
    ckpt = os.path.join(run_dir, "ckpt")
    rng = random.Random(SEED)
    token = f"drill-{uuid.uuid4().hex}/"
    done, history, attempts = 0, [], []
    for attempt in range(KILLS + 1):
        log_path = tmp_path / f"attempt{attempt:02d}.log"
        since = time.time()
        marker = f"{token}{attempt}/"
        proc = launch(tiny_qwen2, run_dir, marker, log_path)
        attempts.append((log_path, done))
        final = attempt == KILLS
        if not final:
            kind, step, delay = plan_kill(rng, attempt, done)
            try:
                reached = wait_for(_event(kind, step, run_dir, ckpt, proc, since), proc)
                if reached:
                    time.sleep(delay)
            except AssertionError:
                kill_everything(proc)
                raise AssertionError(f"attempt {attempt}: no {kind} {step} within the timeout\n{_tail(log_path)}")
            if proc.poll() is None:
                killed = kill_everything(proc)
                left = no_survivors(marker, 10)
                assert not left, (f"attempt {attempt} ({kind} {step} +{delay:.2f}s): still running 10 s after the "
                                  f"kill of {len(killed)} processes:\n" + describe(left))
                history.append((attempt, done, kind, step, round(delay, 2), len(killed)))
            else:
                final = True                               # it finished (or failed) before the kill
        if final:
            rc = proc.wait(timeout=900)
            assert rc == 0, f"attempt {attempt} exited with {rc}:\n{_tail(log_path)}"
            assert not no_survivors(marker, 10), describe(marked(marker))
        named = _pointer(ckpt)
        if named:
            from megatron_bppo.checkpointing import incomplete_reason

            assert incomplete_reason(os.path.join(ckpt, named)) is None, f"latest names an incomplete {named}"
        now = latest_step(ckpt)
        assert now >= done, f"latest went back from step {done} to {now} after attempt {attempt}"
        done = now
        if final:
            break
    print("kill drill (attempt, resumed at, event, step, delay s, processes killed):", history)
    assert len(history) == KILLS, f"the run finished after {len(history)} of {KILLS} kills: {history}"
    assert all(started >= 1 or kind == "saved" for _, started, kind, *_ in history[1:]), history
    for i, (log_path, started_at) in enumerate(attempts):
        if started_at >= 1:
            check_attempt_log(open(log_path, errors="replace").read(), started_at, f"attempt {i}")

    resumed = trainer.metrics(run_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step in resumed:
        for key in DETERMINISTIC:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert not marked(token), describe(marked(token))
