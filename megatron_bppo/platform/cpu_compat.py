"""megatron-core compatibility workarounds for a CPU-only torch build over gloo, and for torch's Adam anywhere.

Checked against megatron-core 0.16.1 and torch 2.13.0+cpu (no TransformerEngine, no Apex). megatron-core
assumes CUDA in a handful of places; each `Workaround` below names the file that needs it, why, and how it
is undone. `apply()` installs all of them on CPU; on CUDA only the two `torch_adam` ones (distopt_*): they fix
megatron-core's generic DistributedOptimizer load path for torch's Adam / AdamW, which it builds on a GPU too when
neither TransformerEngine nor Apex imports, and do nothing for any other optimizer (TE's / Apex's FusedAdam keep
'step' in their param groups). `MEGATRON_BPPO_CPU_SKIP=name1,name2` leaves some out, which tests/test_platform.py
uses to prove every workaround is still needed and still sufficient.

Choices made by configuration instead of patches (see model/bridge.py): batch_p2p_comm=False (so
p2p_communication.py:398 never synchronizes after batched p2p), sequence_parallel=False (torch LayerNorm/RMSNorm
has no sequence-parallel support without TE/Apex), all fusions off, use_cpu_initialization=True.

Workarounds used at their call site on every platform rather than installed by `apply()`:
`ensure_optimizer_state` (checkpointing, before building the optimizer's sharded state dict; acts only on torch's
Adam / AdamW, which megatron-core also uses on a GPU without TE or Apex) and
`in_process_save_results_queue` (checkpointing.save_checkpoint, around the synchronous save: no multiprocessing
Manager per rank that would outlive a killed rank).
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


@dataclass
class Workaround:
    name: str
    where: str           # the megatron-core file(s) that need it
    why: str
    install: Callable[[], None]
    torch_adam: bool = False      # a fix of megatron-core's torch-Adam path: installed on every platform


def _is_torch_adam(optimizer) -> bool:
    """megatron-core's inner optimizer when neither TransformerEngine nor Apex is importable."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` in tensor factory calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


_MODE: _CudaDeviceToCpu | None = None


def _install_current_device():
    torch.cuda.current_device = lambda: _CPU


def _install_synchronize():
    torch.cuda.synchronize = lambda *a, **k: None


def _install_tensor_cuda():
    torch.Tensor.cuda = lambda self, *a, **k: self


def _install_tensor_type():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        with torch._C.DisableTorchFunction():
            name = original(self, dtype, non_blocking, **kwargs)
        if dtype is None and not kwargs and isinstance(name, str) and self.device.type == "cpu" \
                and name.startswith("torch.") and not name.startswith(("torch.cuda.", "torch.sparse")):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_


def _install_cuda_rng():
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all and would recurse into this patch
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # every dropout fork now logs 'CPU RNG state changed within GPU RNG context': expected here.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _install_device_literals():
    global _MODE
    if _MODE is None:
        _MODE = _CudaDeviceToCpu()
        _MODE.__enter__()        # process lifetime; TorchFunctionMode is per thread (the main thread here)


def _install_distopt_load_states():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 or not _is_torch_adam(self.optimizer):
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        missing = [k for k in destination if k not in tensors and k != "step"]
        if missing:
            raise KeyError(f"the checkpoint's optimizer state has no {missing} for a parameter")
        for key in destination:                 # dp_reshardable entries also carry bookkeeping ('padding', ...)
            if key in tensors and key != "step":   # 'step': restored from param_groups (load_state_dict)
                destination[key].copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _install_distopt_step_copy():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        with torch.no_grad():
            result = original(self, state_dict)
        for optimizer in getattr(self, "chained_optimizers", [self]):
            if not _is_torch_adam(optimizer.optimizer):
                continue
            for state in optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict


WORKAROUNDS = [
    Workaround(
        "current_device",
        "distributed/param_and_grad_buffer.py:800, tensor_parallel/layers.py, utils.py:631 (GlobalMemoryBuffer), "
        "models/common/embeddings/rotary_pos_embedding.py:162, pipeline_parallel/p2p_communication.py:190",
        "allocate with device=torch.cuda.current_device(), which raises 'Torch not compiled with CUDA enabled'",
        _install_current_device),
    Workaround(
        "synchronize",
        "pipeline_parallel/p2p_communication.py:242 (_communicate_shapes, taken with variable_seq_lengths=True)",
        "calls torch.cuda.synchronize() unconditionally after exchanging shapes; CPU ops are synchronous, "
        "so a no-op is exact",
        _install_synchronize),
    Workaround(
        "tensor_cuda",
        "optimizer/distrib_optimizer.py:1089 (get_parameter_state_dp_zero, used by the fully_reshardable "
        "checkpoint format), tensor_parallel/data.py:84 (broadcast_data)",
        "move tensors with Tensor.cuda() before collectives; on CPU the tensor is already where gloo needs it",
        _install_tensor_cuda),
    Workaround(
        "tensor_type",
        "optimizer/distrib_optimizer.py:420, optimizer/optimizer.py:690, optimizer/clip_grads.py:167",
        "dispatch/assert on param.type() == 'torch.cuda.FloatTensor'; CPU tensors report torch.FloatTensor",
        _install_tensor_type),
    Workaround(
        "cuda_rng",
        "tensor_parallel/random.py:235 (CudaRNGStatesTracker.add) and :41/:72",
        "the model-parallel RNG tracker (dropout, init, attention fork) reads/writes torch.cuda RNG state; "
        "back it with the CPU default generator",
        _install_cuda_rng),
    Workaround(
        "device_literals",
        "pipeline_parallel/schedules.py:596, optimizer/clip_grads.py:90-207, optimizer/optimizer.py:473, "
        "transformer/utils.py:35 (causal mask), distributed/param_and_grad_buffer.py:768",
        "factory calls with a literal device='cuda'; a TorchFunctionMode rewrites them to the CPU",
        _install_device_literals),
    Workaround(
        "distopt_load_states",
        "optimizer/distrib_optimizer.py:911 (_set_main_param_and_optimizer_states)",
        "with torch Adam (no Apex/TE) the fully_reshardable load passes no 'step' tensor while the destination "
        "has one -> KeyError: 'step'; copy the destination's keys the checkpoint has, except 'step' (restored "
        "from param_groups by load_state_dict's non-Apex path; a dp_reshardable entry's own 'step' loads as 0 "
        "here, measured: the dp_reshardable template wraps the fresh optimizer's step 0 as a non-persistent "
        "local value, :1664-1667, which this copy would write over the restored step, on GPU as on CPU) and "
        "dp_reshardable's bookkeeping keys ('padding', 'gbuf_local_start', ...). torch Adam only",
        _install_distopt_load_states, torch_adam=True),
    Workaround(
        "distopt_step_copy",
        "optimizer/distrib_optimizer.py (load_state_dict, non-Apex/TE 'step' path)",
        "load_state_dict assigns one shared 'step' tensor to every param; torch Adam increments it once per "
        "param, corrupting bias correction (silent). Give each param its own copy; load under no_grad "
        "(in-place copy into leaf views otherwise raises). torch Adam only",
        _install_distopt_step_copy, torch_adam=True),
]


def skipped() -> set[str]:
    return set(filter(None, os.environ.get("MEGATRON_BPPO_CPU_SKIP", "").split(",")))


_APPLIED: list[str] = []


def apply() -> list[str]:
    """Install the workarounds this platform needs (idempotent): every one on CPU, the torch_adam ones on CUDA.
    Returns the names applied."""
    if _APPLIED:
        return list(_APPLIED)
    cuda = torch.cuda.is_available()
    skip = skipped()
    unknown = skip - {w.name for w in WORKAROUNDS}
    if unknown:
        raise ValueError(f"MEGATRON_BPPO_CPU_SKIP names unknown workarounds {sorted(unknown)}; "
                         f"known: {[w.name for w in WORKAROUNDS]}")
    for workaround in WORKAROUNDS:
        if workaround.name not in skip and (workaround.torch_adam or not cuda):
            workaround.install()
            _APPLIED.append(workaround.name)
    return list(_APPLIED)


def ensure_optimizer_state(optimizer) -> None:
    """Torch Adam (no Apex/TE) has no state before its first step, but DistributedOptimizer.state_dict()
    asserts one common 'step' (distrib_optimizer.py:639-643, its `not HAVE_APEX_OR_TE` branch), both when saving
    before the first step and when building the load-time sharded state dict. Create the state Adam would create
    (zero moments, step 0) so there is something to save and somewhere to load into. Harmless where state
    already exists.

    Only for torch's Adam/AdamW, the optimizer megatron-core builds without TransformerEngine and Apex
    (optimizer/__init__.py:12-34 and :359-360): always on CPU, and on a GPU without either. TE's / Apex's
    FusedAdam keep 'step' in their param groups, not in the per-parameter state (distrib_optimizer.py:654-666),
    and may keep other state (master weights, precision-aware moments) that this must not touch; megatron-core
    allocates their state itself on load (sharded_state_dict(is_loading=True), distrib_optimizer.py:1264-1268 ->
    load_state_dict, :766-790). Any other optimizer is left as it is."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(getattr(chained, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if getattr(chained, "init_state_fn", None) is not None:
            if not chained.optimizer.state:
                chained.init_state_fn(chained.optimizer, chained.config)
            for state in chained.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def in_process_save_results_queue():
    """A synchronous dist_checkpointing.save without the multiprocessing Manager megatron-core starts for it.

    WORKAROUND (megatron-core 0.16.1, dist_checkpointing/strategies/filesystem_async.py:51-56, :181-187): the
    default torch_dist save strategy (TorchDistSaveShardedStrategy, strategies/torch.py:105-107) writes through
    FileSystemWriterAsync, whose prepare_write_data takes a results queue from _get_write_results_queue():
    `mp.get_context("spawn").Manager().Queue()`, created on a rank's first save and kept in a module global for
    the life of the process. That starts two processes per rank (the Manager's server and, through "spawn",
    multiprocessing's resource tracker), by fork+exec, in the rank's process group, and nothing makes them end with
    the rank: a SIGKILLed rank leaves them running for good (torchrun signals only workers still alive,
    elastic/multiprocessing/api.py:1026-1033; measured: 24 such processes, 4 GB, after 20 kills of a 2-rank run).
    No strategy option avoids it (thread_count, cached_metadata, separation_hint: strategies/torch.py:597-637).
    A synchronous save does not need a cross-process queue: base.py:212-215 runs it as async_save() +
    AsyncRequest.execute_sync() (async_utils.py:79-103), which calls write_preloaded_data_multiproc in this process
    (it forks its writer processes and puts their collected results into that queue, filesystem_async.py:335),
    and retrieve_write_results() reads it back in this process with get_nowait() (:435-441). So for the save we
    put a thread-safe in-process queue.Queue in that module global, and the previous value back afterwards.
    Only for synchronous saves: an async save (async_sharded_save=True) runs the writer in another process,
    whose results would never reach an in-process queue (its finalize would then fail with "results_queue should
    not be empty", not silently). tests/test_platform.py checks that megatron-core still starts the Manager
    without this, that it outlives its SIGKILLed rank, and that the save with it starts no helper and loads back.
    megatron-core 0.19.2 (the GPU stack, read, not run): the same module global `_results_queue`
    (filesystem_async.py:49, a spawn Manager().Queue() at :62-66, now from get_write_results_queue), the
    synchronous save as async_save + execute_sync (strategies/torch.py:725-729), results read with get_nowait
    (:462); its writers are threads (:253), so this still applies.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous
