"""A rank dies with its launcher: torchrun / srun parent -> rank (PR_SET_PDEATHSIG or a getppid() watchdog)
-> what the rank forks from its main thread (an at-fork hook binds each child to the rank).

`bind_to_launcher` is called first by the `train` command and by `distributed.init_distributed`. Why: torchrun
starts every worker in a session of its own, so `kill -9` of torchrun (or of its process group) left the workers
running, orphaned, in the run's checkpoint directory. Each rank started by torchrun or srun asks the kernel for SIGKILL
when its parent exits (Linux PR_SET_PDEATHSIG; elsewhere a thread polls getppid() every second), and every
process the rank then forks from its main thread dies with the rank the same way. docs/operations.md, "When
a process is killed".
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Mapping, Optional

EXIT_WITH_LAUNCHER_ENV = "MEGATRON_BPPO_EXIT_WITH_LAUNCHER"     # "0": do not bind (see bind_to_launcher)
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2
# The parent as early as this process can see it: the launcher, unless it died before this module was imported.
_PARENT_AT_IMPORT = os.getppid()
_BOUND: Optional[str] = None
_FORK_PARENT: tuple[int, bool] = (0, False)      # (pid, forking from the main thread), set just before each fork
_PRCTL = None          # libc's prctl, looked up once (so that a forked child calls it without dlopen)


def _prctl(option: int, arg: int) -> bool:
    global _PRCTL
    if not sys.platform.startswith("linux"):
        return False
    if _PRCTL is None:
        try:
            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL = False
            return False
        _PRCTL.restype = ctypes.c_int
        _PRCTL.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return bool(_PRCTL) and _PRCTL(option, arg, 0, 0, 0) == 0


def parent_death_signal() -> Optional[int]:
    """The signal this process gets when its parent exits (0: none); None where prctl is not available."""
    value = ctypes.c_int(0)
    return value.value if _prctl(_PR_GET_PDEATHSIG, ctypes.addressof(value)) else None


def _parent_gone(what: str, parent: int):
    try:
        sys.stderr.write(f"megatron-bppo: {what} (pid {parent}) is gone; pid {os.getpid()} exits with it\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 -- stderr may be a pipe nobody reads any more
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent: int, what: str, interval: float):
    while os.getppid() == parent:
        time.sleep(interval)
    _parent_gone(what, parent)


def die_with_parent(parent: int, what: str = "the parent process", poll_s: float = 1.0) -> str:
    """SIGKILL this process as soon as `parent` (its parent when this process started) exits.

    Linux: PR_SET_PDEATHSIG. The kernel sends the signal when the *thread* that forked this process exits, so the
    parent must have forked it from a thread that lives as long as the parent itself (torchrun: its main thread,
    see bind_to_launcher). Not inherited by this process's own children (cleared on fork), kept across execve.
    The parent may have died before the call: then this process already has another parent (init or a
    subreaper) and dies at once. Elsewhere (no prctl) a daemon thread polls getppid() every `poll_s` seconds.
    Returns the mechanism: "prctl" or "watchdog"."""
    mechanism = "prctl" if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) else "watchdog"
    if os.getppid() != parent:
        _parent_gone(what, parent)
    if mechanism == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent, what, poll_s), daemon=True,
                         name="megatron_bppo-parent-watch").start()
    return mechanism


def _launcher_of(env: Mapping[str, str]) -> Optional[str]:
    """The launcher that is this process's parent, when it is one we know: torchrun's elastic agent (it sets
    TORCHELASTIC_RUN_ID and starts workers itself) or Slurm (srun: slurmstepd or the task's shell; a batch
    script: its shell). None otherwise (a plain process, or RANK/WORLD_SIZE set by something else)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "srun"
    return None


def _note_fork_parent():
    global _FORK_PARENT
    _FORK_PARENT = (os.getpid(), threading.current_thread() is threading.main_thread())


def _bind_forked_child():
    parent, from_main_thread = _FORK_PARENT
    # a fork from another thread would die when that thread ends, not with the rank: left unbound
    if parent and from_main_thread:
        die_with_parent(parent, "its rank")


def bind_to_launcher(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Make this rank die with its launcher, and what it forks die with it. Idempotent; returns the mechanism
    ("prctl" / "watchdog") or None when not bound.

    Bound only when the parent is a launcher that supervises the rank (`_launcher_of`): torchrun starts each
    worker with subprocess.Popen(start_new_session=True) from the thread that runs the agent's monitor loop,
    its main thread (torch 2.13: elastic/multiprocessing/subprocess_handler/subprocess_handler.py:63-76 and
    api.py:949-962, called from LocalElasticAgent._start_workers, agent/server/api.py:906-970, inside
    launch_agent -> agent.run(), launcher/api.py:374), so that thread lives as long as torchrun. Under srun the
    parent is slurmstepd (which forks tasks from its job_manager, in its main thread) or, with
    slurm/train.sbatch, the task's bash, which waits for the rank. A plain `python -m megatron_bppo.cli` is not
    bound (its parent is a shell, and nohup / a closed terminal must not end it). MEGATRON_BPPO_EXIT_WITH_LAUNCHER=0
    turns it off, e.g. when a wrapper script sits between torchrun and the rank (then the wrapper is the parent).

    What the rank forks from its main thread afterwards -- megatron-core's checkpoint writer processes, fork-started
    multiprocessing helpers -- is bound to the rank by an at-fork hook (the setting itself is not inherited).
    Processes started by fork+exec (subprocess, multiprocessing "spawn") are not covered: they run no Python
    between fork and exec; checkpointing.save_checkpoint avoids the one such helper megatron-core would start."""
    global _BOUND
    env = os.environ if env is None else env
    if _BOUND is not None:
        return _BOUND
    if env.get(EXIT_WITH_LAUNCHER_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    launcher = _launcher_of(env)
    if launcher is None:
        return None
    _BOUND = die_with_parent(_PARENT_AT_IMPORT, f"its launcher ({launcher})")
    os.register_at_fork(before=_note_fork_parent, after_in_child=_bind_forked_child)
    return _BOUND


__all__ = ["EXIT_WITH_LAUNCHER_ENV", "bind_to_launcher", "die_with_parent", "parent_death_signal"]
