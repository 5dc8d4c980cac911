"""Device and backend choice: CUDA + NCCL where a GPU is present, CPU + gloo otherwise.

`init_platform()` is the one entry point; it also applies the megatron-core compatibility workarounds from
`cpu_compat` (the only place in megatron_bppo that patches torch or megatron): all of them on CPU, the torch-Adam
optimizer-load fixes on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str                       # "nccl" | "gloo"
    applied_workarounds: tuple = field(default_factory=tuple)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


_PLATFORM: Platform | None = None


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses: its local rank modulo the devices it sees (with srun --gpus-per-task=1 every task sees
    one device, index 0, whatever its SLURM_LOCALID). vLLM's LOCAL_RANK must be this index too."""
    return local_rank % device_count if device_count else local_rank


def init_platform(backend: str = "auto", local_rank: int | None = None) -> Platform:
    """Pick device/backend once per process and apply the megatron-core workarounds it needs."""
    global _PLATFORM
    from . import cpu_compat

    if _PLATFORM is not None:
        return _PLATFORM
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if torch.cuda.is_available():
        if backend == "gloo":
            raise RuntimeError("parallel.backend=gloo on a CUDA machine is not supported: use auto or nccl")
        torch.cuda.set_device(device_index(local_rank, torch.cuda.device_count()))
        _PLATFORM = Platform(torch.device("cuda", torch.cuda.current_device()), "nccl", tuple(cpu_compat.apply()))
    else:
        if backend == "nccl":
            raise RuntimeError("parallel.backend=nccl needs a CUDA GPU and none is visible: use auto or gloo")
        _PLATFORM = Platform(torch.device("cpu"), "gloo", tuple(cpu_compat.apply()))
    return _PLATFORM


def current_platform() -> Platform:
    if _PLATFORM is None:
        return init_platform()
    return _PLATFORM


def uses_cuda() -> bool:
    """Whether this process runs (or, before `init_platform`, will run) on CUDA + NCCL: the platform chosen, or
    the test init_platform makes (a visible GPU). Has no side effect: it does not choose the platform."""
    return _PLATFORM.is_cuda if _PLATFORM is not None else torch.cuda.is_available()


def synchronize() -> None:
    """Wait for the GPU work queued on this rank's device; nothing on CPU or before the platform is chosen (this
    process has queued no GPU work then). The device is named: a bare torch.cuda.synchronize() before
    init_platform's set_device would create a CUDA context on device 0 in every rank of the node
    (torch/cuda/__init__.py:1209-1219: _lazy_init, then the *current* device)."""
    platform = _PLATFORM
    if platform is not None and platform.is_cuda:
        torch.cuda.synchronize(platform.device)


def phase_sync(platform: Optional[Platform] = None) -> Optional[Callable[[], None]]:
    """The `sync` for metrics.PhaseTimer: `synchronize` on a CUDA platform (GPU kernels run asynchronously, so
    without it a phase's GPU work is charged to whichever phase next waits for it), None on CPU. `platform`
    defaults to this process's (`uses_cuda`), so the timer can be built before init_platform runs."""
    cuda = platform.is_cuda if platform is not None else uses_cuda()
    return synchronize if cuda else None


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
