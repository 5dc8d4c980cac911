"""Process-group start-up from torchrun's or Slurm's environment, then Megatron's parallel_state (TP, PP, DP).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` (one task per GPU)
we read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and take MASTER_ADDR from the first host of
SLURM_JOB_NODELIST and MASTER_PORT from the job id. Without either, a single process (world size 1).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass

import torch.distributed as dist

from .config import ParallelConfig
from .errors import ConfigError
from .platform import init_platform


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str             # "torchrun" | "slurm" | "single"


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local torchrun's --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int) -> list[str]:
    """The local launcher prefix: this interpreter's torchrun with nproc ranks on a free port."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, f"--nproc-per-node={nproc}", f"--master-port={free_local_port()}"]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm compressed host list -> host names: 'gpu[01-03,7],cpu1' -> [gpu01, gpu02, gpu03, gpu7, cpu1]."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    if not hosts:
        raise ValueError(f"cannot parse Slurm nodelist {nodelist!r}")
    return hosts


def detect_launch(env=None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_nodelist(nodelist)[0]
        else:
            raise RuntimeError("Slurm launch without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the "
                               "rendezvous host; export MASTER_ADDR in the sbatch script")
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 10000))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "single")


def check_layout(world_size: int, parallel: ParallelConfig, num_heads: int | None = None,
                 num_kv_heads: int | None = None, num_layers: int | None = None,
                 vocab_size: int | None = None) -> int:
    """Validate TP*PP*DP == world size and that TP/PP fit the model; returns DP."""
    tp, pp = parallel.tp, parallel.pp
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {tp}*{pp}: "
                          f"launch a multiple of {tp * pp} processes or change tp/pp")
    dp = world_size // (tp * pp)
    if parallel.dp is not None and parallel.dp != dp:
        raise ConfigError(f"parallel.dp={parallel.dp} but world size {world_size} / (tp {tp} * pp {pp}) = {dp}: "
                          f"launch {tp * pp * parallel.dp} processes or set parallel.dp=null")
    if num_heads is not None and num_heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {num_heads} attention heads: "
                          "choose a tp that divides it")
    if num_kv_heads is not None and num_kv_heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {num_kv_heads} key/value heads: "
                          "choose a tp that divides it")
    if num_layers is not None and num_layers % pp:
        raise ConfigError(f"parallel.pp={pp} does not divide the model's {num_layers} layers: "
                          "choose a pp that divides it")
    if vocab_size is not None and vocab_size % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the vocabulary size {vocab_size}: choose another tp")
    return dp


def init_distributed(parallel: ParallelConfig, model_dims: dict | None = None, seed: int = 1234):
    """Start torch.distributed (if needed) and Megatron parallel_state. Returns (LaunchEnv, Platform)."""
    launch = detect_launch()
    check_layout(launch.world_size, parallel, **(model_dims or {}))
    platform = init_platform(parallel.backend, launch.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(platform.backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=parallel.timeout_s))
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tp,
                                                 pipeline_model_parallel_size=parallel.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch, platform


def destroy_distributed():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


__all__ = ["LaunchEnv", "expand_nodelist", "detect_launch", "check_layout", "init_distributed",
           "destroy_distributed", "is_rank0", "print_rank0", "barrier"]
