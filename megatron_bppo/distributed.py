"""Process-group start-up from torchrun's or Slurm's environment, then Megatron's parallel_state (TP, PP, DP).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` (one task per GPU)
we read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and take MASTER_ADDR from the first host of
SLURM_JOB_NODELIST and MASTER_PORT from the job id. Without either, a single process (world size 1).

A rank dies with its launcher: `lifetime.bind_to_launcher`, called first in `init_distributed`.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from math import gcd
from typing import Optional, Sequence

import torch.distributed as dist

from .config import ParallelConfig
from .errors import ConfigError
from .lifetime import bind_to_launcher
from .platform import init_platform, uses_cuda

logger = logging.getLogger(__name__)


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


def launch_rank(env=None) -> int:
    """This process's global rank for "only rank 0 prints" decisions, at any time: the process group's once it
    exists, else the launcher's environment (torchrun RANK, Slurm SLURM_PROCID), 0 for a plain process. Never
    raises, unlike detect_launch (which needs a complete launch to find the rendezvous)."""
    if env is None and dist.is_initialized():
        return dist.get_rank()
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    except ValueError:
        return 0


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


# ------------------------------------------------------------------------------------- network and timeouts
def gloo_ifname_from_nccl(nccl_ifname: str, interfaces: Sequence[str]) -> Optional[str]:
    """The interface gloo should bind to, given NCCL_SOCKET_IFNAME and this host's interfaces, or None when it
    cannot be told. NCCL reads a list of name *prefixes* ("ib" matches ib0), "=" before the list for exact names,
    "^" for a list to exclude; gloo (GLOO_SOCKET_IFNAME, read by torch's ProcessGroupGloo constructor for every
    gloo group) wants exact interface names, one gloo device each. So: the first of `interfaces` that the
    first matching entry names; None for an exclusion list ("^lo,docker0": which interface NCCL then picks is
    NCCL's own choice) or when nothing here matches."""
    spec = nccl_ifname.strip()
    if not spec or spec.startswith("^"):
        return None
    exact = spec.startswith("=")
    for entry in filter(None, (e.strip() for e in spec.lstrip("=").split(","))):
        for name in interfaces:
            if name == entry or (not exact and name.startswith(entry)):
                return name
    return None


def _interfaces() -> list[str]:
    """This host's network interfaces that are up (psutil, a vLLM dependency), else every one the kernel lists."""
    try:
        import psutil

        stats = psutil.net_if_stats()
        return [name for name in psutil.net_if_addrs() if name not in stats or stats[name].isup]
    except Exception:  # noqa: BLE001 -- psutil missing or unreadable: the kernel's list
        return [name for _, name in socket.if_nameindex()]


def set_gloo_socket_ifname(env=None) -> Optional[str]:
    """GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME when only the latter is set. gloo sockets -- megatron-core's
    data-parallel gloo groups (parallel_state.py create_group(..., backend="gloo")), vLLM's CPU groups, the whole
    world on CPU -- otherwise bind to whatever the hostname resolves to, e.g. a management network or nothing
    reachable. Must run before any process group exists (the variable is read when a gloo group is created).
    Returns the value set, or None (already set, nothing to derive from, or no match: then a warning)."""
    env = os.environ if env is None else env
    nccl = env.get("NCCL_SOCKET_IFNAME", "").strip()
    if not nccl or env.get("GLOO_SOCKET_IFNAME", "").strip():
        return None
    name = gloo_ifname_from_nccl(nccl, _interfaces())
    if name is None:
        logger.warning("NCCL_SOCKET_IFNAME=%s names no interface of %s that gloo could use (gloo needs an exact "
                       "interface name, not an exclusion list or a prefix without a match): set GLOO_SOCKET_IFNAME "
                       "too, or gloo groups bind to the interface the hostname resolves to", nccl,
                       socket.gethostname())
        return None
    env["GLOO_SOCKET_IFNAME"] = name
    return name


CPU_TIMEOUT_S = 600         # parallel.timeout_s when not set, CPU (gloo)
GPU_TIMEOUT_S = 1800        # ... GPU (NCCL): megatron-core's own default for its groups (30 min)


def process_group_timeout_s(parallel: ParallelConfig, cuda: Optional[bool] = None) -> int:
    """Seconds a collective on the default process group may wait: parallel.timeout_s when set, otherwise
    GPU_TIMEOUT_S on a CUDA platform and CPU_TIMEOUT_S on CPU (`cuda` defaults to platform.uses_cuda()).
    Replicas wait on the default group while another replica still samples (rollout gather) and while rank 0
    finishes a checkpoint; with TORCH_NCCL_ASYNC_ERROR_HANDLING=1 a timeout there kills the job. Megatron's
    TP/PP/DP groups use initialize_model_parallel's distributed_timeout_minutes (30) whatever this is."""
    if getattr(parallel, "timeout_s", None) is not None:
        return int(parallel.timeout_s)
    return GPU_TIMEOUT_S if (uses_cuda() if cuda is None else cuda) else CPU_TIMEOUT_S


# ------------------------------------------------------------------------------------- TP groups within a node
_RANK_HOSTS: Optional[list[str]] = None


def rank_hosts() -> list[str]:
    """The host name of every rank (index: global rank). One all_gather_object per world, on first call
    (init_distributed makes it), cached until destroy_distributed; every rank must call it together then."""
    global _RANK_HOSTS
    if not dist.is_initialized():
        return [socket.gethostname()]
    world = dist.get_world_size()
    if _RANK_HOSTS is None or len(_RANK_HOSTS) != world:
        hosts: list = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        _RANK_HOSTS = [str(h) for h in hosts]
    return list(_RANK_HOSTS)


def tp_groups_across_nodes(hosts: Sequence[str], tp: int) -> list[tuple[list[int], list[str]]]:
    """The groups of `tp` consecutive ranks (a Megatron TP group under its default order tp-cp-ep-dp-pp; a rollout
    engine replica) whose ranks are on more than one host: [(ranks, their hosts)]. `hosts[r]`: rank r's host."""
    out = []
    for start in range(0, len(hosts) - tp + 1, tp):
        ranks = list(range(start, start + tp))
        names = [hosts[r] for r in ranks]
        if len(set(names)) > 1:
            out.append((ranks, names))
    return out


def check_tp_within_node(key: str, tp: int, hosts: Sequence[str], strict: bool = True) -> None:
    """Tensor parallelism all-reduces every layer: a TP group that spans nodes runs it over the network (and
    vLLM's custom all-reduce refuses it). Raises ConfigError naming `key` (parallel.tp / rollout.tp), the groups,
    their hosts and the fix; with strict=False (CPU, gloo: no intra-node fast path to lose) it only warns."""
    if tp <= 1:
        return
    bad = tp_groups_across_nodes(hosts, tp)
    if not bad:
        return
    per_node = list(Counter(hosts).values())        # ranks per host, in rank order
    common = 0
    for n in per_node:
        common = gcd(common, n)
    fits = [d for d in range(1, common + 1) if common % d == 0]
    shown = "; ".join(f"ranks {r[0]}-{r[-1]} on {', '.join(dict.fromkeys(h))}" for r, h in bad[:4])
    more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
    message = (f"{key}={tp}: {len(bad)} tensor-parallel group(s) span more than one node: {shown}{more}. Ranks are "
               f"placed node-major ({'/'.join(map(str, per_node))} rank(s) on the {len(per_node)} node(s)), so a "
               f"group of {tp} consecutive ranks stays in one node only when {key} divides the ranks (GPUs) per "
               f"node: choose {key} in {fits}, or launch a multiple of {tp} ranks per node")
    if strict:
        raise ConfigError(message)
    logger.warning("%s (allowed on CPU, where gloo has no intra-node fast path)", message)


def init_distributed(parallel: ParallelConfig, model_dims: dict | None = None, seed: int = 1234):
    """Start torch.distributed (if needed) and Megatron parallel_state. Returns (LaunchEnv, Platform).
    First binds this rank to its launcher (bind_to_launcher): every process that joins a process group goes
    through here, the trainer, tools/convert_checkpoint.py and the bench / test workers alike. Before any group:
    GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME (set_gloo_socket_ifname). Then the host of every rank, gathered
    once (rank_hosts): a Megatron TP group must stay in one node (check_tp_within_node; CPU: a warning)."""
    bind_to_launcher()
    set_gloo_socket_ifname()
    launch = detect_launch()
    check_layout(launch.world_size, parallel, **(model_dims or {}))
    platform = init_platform(parallel.backend, launch.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        timeout = process_group_timeout_s(parallel, platform.is_cuda)
        dist.init_process_group(platform.backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    if dist.get_world_size() > 1:
        check_tp_within_node("parallel.tp", parallel.tp, rank_hosts(), strict=platform.is_cuda)
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tp,
                                                 pipeline_model_parallel_size=parallel.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch, platform


def destroy_distributed():
    global _RANK_HOSTS
    from megatron.core import parallel_state

    _RANK_HOSTS = None

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
           "gloo_ifname_from_nccl", "set_gloo_socket_ifname",
           "process_group_timeout_s", "rank_hosts", "tp_groups_across_nodes", "check_tp_within_node",
           "destroy_distributed", "is_rank0", "print_rank0", "barrier"]
