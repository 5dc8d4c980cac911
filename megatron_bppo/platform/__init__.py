"""Device and backend choice: CUDA + NCCL where a GPU is present, CPU + gloo otherwise.

`init_platform()` is the one entry point; on CPU it also applies the megatron-core compatibility
workarounds from `cpu_compat` (the only place in megatron_bppo that patches torch or megatron).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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


def init_platform(backend: str = "auto", local_rank: int | None = None) -> Platform:
    """Pick device/backend once per process; on CPU apply the megatron-core workarounds."""
    global _PLATFORM
    if _PLATFORM is not None:
        return _PLATFORM
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if torch.cuda.is_available():
        if backend == "gloo":
            raise RuntimeError("parallel.backend=gloo on a CUDA machine is not supported: use auto or nccl")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _PLATFORM = Platform(torch.device("cuda", torch.cuda.current_device()), "nccl")
    else:
        if backend == "nccl":
            raise RuntimeError("parallel.backend=nccl needs a CUDA GPU and none is visible: use auto or gloo")
        from . import cpu_compat

        _PLATFORM = Platform(torch.device("cpu"), "gloo", tuple(cpu_compat.apply()))
    return _PLATFORM


def current_platform() -> Platform:
    if _PLATFORM is None:
        return init_platform()
    return _PLATFORM


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
