"""The run lock: <checkpoint.dir>/megatron_bppo.lock names the live run that writes there.

    every rank, before any process group exists --(check_checkpoint_lock: read-only, same rules on every rank)-->
      refuse (ConfigError: a live owner, or one this rank cannot prove gone) | go on
    rank 0 --(take_checkpoint_lock: write {host, pid, start time, launch} atomically; take over a provably dead
      owner's lock)--> CheckpointLock, released when rank 0's interpreter exits; other ranks wait until the lock
      names their launch

A refusal therefore ends every rank with the same ConfigError instead of leaving some blocked in the rendezvous.
A SIGKILLed owner leaves its lock behind; the next run takes it over when the owner is provably gone (same host
and the pid dead or reused, or an earlier attempt of the same Slurm job): rules in lock_verdict,
docs/operations.md. checkpoint.break_lock=true takes any lock (one-off, on the command line).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from typing import Mapping, Optional

from .errors import ConfigError

logger = logging.getLogger(__name__)
LOCK = "megatron_bppo.lock"
def _process_start_time(pid: int) -> Optional[float]:
    """Start time (seconds since the epoch) of the live process `pid`; None when there is none (zombies are
    dead); -1.0 when it exists but cannot be inspected."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0


def lock_identity(env: Optional[Mapping[str, str]] = None) -> dict:
    """This process as a lock owner. `launch` is the same string on every rank of one launch (torchrun or srun
    rendezvous address, job / restart ids) and differs between launches alive at the same time."""
    env = os.environ if env is None else env
    host, pid = socket.gethostname(), os.getpid()
    if ("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_NTASKS" in env):
        addr = env.get("MASTER_ADDR", "")
        loopback = addr in ("", "localhost", "::1") or addr.startswith("127.")   # then all ranks are on this host
        launch = "|".join([host if loopback else "", addr, env.get("MASTER_PORT", ""),
                           env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "")), env.get("TORCHELASTIC_RUN_ID", ""),
                           env.get("TORCHELASTIC_RESTART_COUNT", ""), env.get("SLURM_JOB_ID", ""),
                           env.get("SLURM_STEP_ID", ""), env.get("SLURM_RESTART_COUNT", "")])
    else:
        launch = f"single|{host}|{pid}"
    start = _process_start_time(pid)
    return {"host": host, "pid": pid, "start_time": start,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start if start and start > 0 else None)),
            "launch": launch, "slurm_job_id": env.get("SLURM_JOB_ID", ""),
            "slurm_restart_count": env.get("SLURM_RESTART_COUNT", "")}


def _on_rank0_node(rank: int, env: Mapping[str, str]) -> bool:
    """Whether this rank runs on rank 0's host (then it can judge the lock exactly as rank 0 does)."""
    if rank == 0:
        return True
    if "RANK" in env and "WORLD_SIZE" in env:              # torchrun: node (group) 0 holds global rank 0
        return env.get("GROUP_RANK") == "0" or env.get("LOCAL_WORLD_SIZE") == env["WORLD_SIZE"]
    if "SLURM_PROCID" in env:                              # srun: task 0 runs on the step's first node
        return env.get("SLURM_NODEID") == "0" or "1" in (env.get("SLURM_STEP_NUM_NODES"), env.get("SLURM_NNODES"))
    return False


def _owner(info: dict) -> str:
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on host {info.get('host')!r} (started {info.get('started', '?')}{job})"


def lock_verdict(info, me: dict, rank: int, on_rank0_node: bool, break_lock: bool = False) -> tuple[str, str]:
    """What rank `rank` does with the lock content `info` (None: no lock file): (action, reason), action one of
    free | ours | take_over | refuse | wait (a rank not on rank 0's host that cannot judge: rank 0 decides).
    Every rank that can judge reaches rank 0's verdict."""
    if info is None:
        return "free", ""
    if not isinstance(info, dict) or not isinstance(info.get("host"), str) or not isinstance(info.get("pid"), int):
        return ("take_over", "checkpoint.break_lock=true") if break_lock else ("refuse", "the lock file is unreadable")
    if rank == 0 and info["host"] == me["host"] and info["pid"] == me["pid"]:
        return "ours", ""
    if rank != 0 and info.get("launch") == me["launch"]:
        return "ours", ""                                   # rank 0 of this launch has taken it
    owner = _owner(info)
    if break_lock:
        return "take_over", f"checkpoint.break_lock=true: taking it over from {owner}"
    if me.get("slurm_job_id") and info.get("slurm_job_id") == me["slurm_job_id"] \
            and info.get("slurm_restart_count") != me.get("slurm_restart_count"):
        return "take_over", f"{owner} was an earlier attempt of this (requeued) Slurm job"
    if on_rank0_node and info["host"] != me["host"]:
        return "refuse", (f"it is held by {owner}, another host: whether that process still runs cannot be "
                          "checked from here")
    if info["host"] == me["host"]:
        gone = _owner_gone(info)
        if gone:
            return ("take_over", f"its owner, {owner}, {gone}") if on_rank0_node else ("wait", "")
        return "refuse", f"it is held by a live run: {owner}"   # for a rank 0 on another host: refused as well
    return "wait", ""                                       # neither here nor on rank 0's host: rank 0 decides


def _owner_gone(info: dict) -> str:
    """Why the lock owner `info` (on this host) is not running any more; "" when it is (or may be)."""
    start = _process_start_time(int(info["pid"]))
    if start is None:
        return "is not running any more"
    recorded = info.get("start_time")
    if start > 0 and isinstance(recorded, (int, float)) and recorded > 0 and abs(start - recorded) > 1.0:
        return "is not running any more (that pid is another process now)"
    return ""


def _read_lock(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"


class CheckpointLock:
    """The lock this process (rank 0) holds; `release()` removes it if it still names this process."""

    def __init__(self, path: str, me: dict):
        self.path, self.me = path, me

    def held(self) -> bool:
        info = _read_lock(self.path)
        return isinstance(info, dict) and info.get("host") == self.me["host"] and info.get("pid") == self.me["pid"]

    def release(self):
        try:
            if self.held():
                os.remove(self.path)
        except OSError:
            pass


def _write_lock(root: str, path: str, me: dict, exclusive: bool):
    try:
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{me['host']}.{me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f, indent=2)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir={root!r} cannot be written ({e}): choose a writable directory") from None
    try:
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)                   # atomic create-if-absent with the full content (FileExistsError)
        except FileExistsError:
            raise
        except OSError:                          # a file system without hard links
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f, indent=2)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _judge_lock(root: str, rank: int, break_lock: bool, env: Mapping[str, str], me: dict):
    path = os.path.join(root, LOCK)
    info = _read_lock(path)
    action, why = lock_verdict(info, me, rank, _on_rank0_node(rank, env), break_lock)
    if action == "refuse":
        owner = f" ({os.path.basename(path)} names {_owner(info)})" if isinstance(info, dict) else ""
        raise ConfigError(
            f"checkpoint.dir={root!r} is locked: {why}{owner}. Two runs writing one checkpoint directory "
            f"overwrite each other's checkpoints. Stop that run or use another checkpoint.dir; if it is not "
            f"running any more, set checkpoint.break_lock=true for this start (or delete {path}).")
    return info, action, why


def check_checkpoint_lock(root: str, rank: Optional[int] = None, break_lock: bool = False,
                          env: Optional[Mapping[str, str]] = None):
    """Read-only: raise ConfigError when checkpoint dir `root` is held by another run this rank can judge live (or
    cannot check). Every rank calls it first, so that a refusal ends every rank before any of them waits."""
    from .distributed import launch_rank

    env = os.environ if env is None else env
    _judge_lock(root, launch_rank(env) if rank is None else rank, break_lock, env, lock_identity(env))


def take_checkpoint_lock(root: str, rank: Optional[int] = None, break_lock: bool = False, wait_s: float = 600,
                         env: Optional[Mapping[str, str]] = None) -> Optional[CheckpointLock]:
    """Lock checkpoint dir `root` for this launch (call on every rank, before the process group starts). Rank 0
    returns the CheckpointLock (released at interpreter exit); other ranks only read the lock and return None once
    rank 0 holds it (up to wait_s). Raises ConfigError, on every rank that can judge it, when a live run (or one
    that cannot be checked) holds it."""
    from .distributed import launch_rank

    env = os.environ if env is None else env
    rank = launch_rank(env) if rank is None else rank
    me, path = lock_identity(env), os.path.join(root, LOCK)
    for _ in range(3):
        info, action, why = _judge_lock(root, rank, break_lock, env, me)
        if rank != 0:
            if action != "ours":
                _wait_for_rank0(root, path, me, rank, wait_s)
            return None
        if action == "ours" and info == me:
            return CheckpointLock(path, me)
        if action == "take_over":
            logger.warning("checkpoint.dir=%r: taking over its lock: %s", root, why)
        try:
            _write_lock(root, path, me, exclusive=action == "free")   # "ours": this pid's stale lock: rewrite
        except FileExistsError:
            continue                             # another run took it in between: judge its lock
        lock = CheckpointLock(path, me)
        if lock.held():                          # a simultaneous take-over by another run: judge again
            atexit.register(lock.release)
            return lock
    raise ConfigError(f"checkpoint.dir={root!r}: its lock {path} keeps changing hands; is another run starting "
                      "in the same directory?")


def _wait_for_rank0(root: str, path: str, me: dict, rank: int, wait_s: float):
    deadline = time.monotonic() + wait_s
    while True:
        info = _read_lock(path)
        if isinstance(info, dict) and info.get("launch") == me["launch"]:
            return
        if time.monotonic() > deadline:
            held = _owner(info) if isinstance(info, dict) else "nobody"
            msg = (f"rank {rank}: rank 0 did not lock checkpoint.dir={root!r} within {wait_s:.0f} s "
                   f"(parallel.timeout_s); the lock names {held}. See rank 0's error.")
            logger.error(msg)                    # the command line prints rank 0's errors only
            raise ConfigError(msg)
        time.sleep(0.2)
