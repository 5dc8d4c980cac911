"""Megatron distributed checkpoints: save atomically, find the latest complete one, load at any TP/PP (the optimizer
state: per checkpoint.optimizer_format).

    <root>/iter_0000010/            one complete checkpoint
        *.distcp, .metadata, ...    model (+ optimizer) in megatron-core's torch_dist format (the model loads at
                                    any layout; the optimizer per checkpoint.optimizer_format)
        hf/                         HF config, tokenizer, generation config (for export back to HF)
        trainer_state.pt            step, LR-scheduler state, caller's extra state (data position, ...)
        rng/rank_00000.pt           per-rank RNG states (restored when the world size matches)
        megatron_bppo.json          written last: its presence marks the checkpoint complete
    <root>/latest                   name of the newest complete checkpoint (replaced atomically)

    <root>/megatron_bppo.lock       the live run that writes here (host, pid, start time): run_lock.py

A checkpoint is written into `.tmp-iter_XXXXXXX` and renamed after every rank has finished, so a crash
during a write never leaves a directory that `latest_checkpoint` would pick. Everything is loaded with
`torch.load(weights_only=True)` or JSON: a checkpoint cannot run code on load.

Resume (`resume_checkpoint`): the newest complete checkpoint (the one `latest` names when it is complete). When the
directory holds only incomplete ones (an `iter_*` without its marker or files, a `latest` naming a missing or
incomplete one, as after a full disk) the run refuses to start from step 0 unless checkpoint.allow_fresh_start;
a `.tmp-iter_*` alone (a write that never finished, nothing was saved) is a normal fresh start. Rotation
(keep_last) counts and removes complete checkpoints only; incomplete ones are left and reported.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .distributed import launch_rank
from .errors import ConfigError
from .model.bridge import copy_hf_side_files
from .platform.cpu_compat import ensure_optimizer_state, in_process_save_results_queue

logger = logging.getLogger(__name__)
META = "megatron_bppo.json"
# How the distributed optimizer's state is laid out on disk (checkpoint.optimizer_format; megatron-core 0.16.1
# DistributedOptimizer.sharded_state_dict): dp_reshardable saves each rank's own flat buffers in parallel, no
# gather, and loads at the same TP x PP with any DP; fully_reshardable gathers the whole DP-unsharded fp32 state of
# a TP x PP shard on its DP rank 0 (at 7B / TP4 ~23 GB of host memory per shard, synchronously) into per-parameter
# tensors that load at any layout. Checkpoints written before the key existed are fully_reshardable.
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
LEGACY_OPTIMIZER_FORMAT = "fully_reshardable"
# megatron-core 0.19.0 moved a checkpoint's common (non-sharded) state from common.pt into the torch_dist files as
# the object "common_state" (0.19.2 dist_checkpointing/serialization.py:200-237, which still reads a common.pt);
# 0.16.1-0.18 read only common.pt (0.16.1 strategies/common.py:83-98: "Common file ... does not exist").
COMMON_STATE_INSIDE_SINCE = (0, 19)


def megatron_core_version() -> str:
    """The version of the megatron-core this process imports (also from a source checkout without metadata)."""
    from megatron.core import package_info

    return package_info.__version__


def check_readable(path: str, meta: dict) -> None:
    """Refuse, with the reason, a checkpoint that the installed megatron-core cannot read: one written by megatron-core
    >= 0.19 (the GPU stack, constraints-gpu.txt) loaded with an older one (the CPU stack's 0.16.1)."""
    if os.path.isfile(os.path.join(path, "common.pt")):
        return
    installed = megatron_core_version()
    if tuple(int(x) for x in installed.split(".")[:2]) >= COMMON_STATE_INSIDE_SINCE:
        return
    writer = meta.get("megatron_core", ">= 0.19 (not recorded)")
    raise ConfigError(f"{path} was written by megatron-core {writer}, which keeps the checkpoint's common state "
                      f"inside its torch_dist files (there is no common.pt); the installed megatron-core {installed} "
                      "reads only common.pt. Load it where megatron-core >= 0.19 is installed (the GPU stack, "
                      "constraints-gpu.txt), e.g. export it there: tools/convert_checkpoint.py mcore-to-hf")


def _optim_metadata(optimizer_format: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_format}


def check_optimizer_layout(path: str, meta: dict, tp: int, pp: int) -> str:
    """The optimizer format `path` was saved in; ConfigError if it cannot load at TP `tp` x PP `pp`."""
    fmt = meta.get("optimizer_format", LEGACY_OPTIMIZER_FORMAT)
    saved = meta.get("layout") or {}
    if fmt == "dp_reshardable" and (saved.get("tp", tp), saved.get("pp", pp)) != (tp, pp):
        raise ConfigError(
            f"{path} holds its optimizer state as dp_reshardable, which loads only at the layout it was saved at "
            f"(parallel.tp={saved.get('tp')}, parallel.pp={saved.get('pp')}; any data-parallel size), not at "
            f"parallel.tp={tp}, parallel.pp={pp}: resume at the saved layout (save again there with "
            "checkpoint.optimizer_format=fully_reshardable to change it later), or start from its weights alone "
            "(tools/convert_checkpoint.py mcore-to-hf, then a new run)")
    if fmt not in OPTIMIZER_FORMATS:
        raise ValueError(f"{path}: unknown optimizer_format {fmt!r} in {META}")
    return fmt


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _step_of(name: str) -> int:
    digits = name.rsplit("iter_", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def incomplete_reason(path: str) -> Optional[str]:
    """Why the checkpoint directory `path` cannot be loaded (None: it is complete). Cheap: file checks only."""
    if not os.path.isdir(path):
        return "does not exist"
    meta = os.path.join(path, META)
    if not os.path.isfile(meta):
        return f"no {META} (its write did not finish)"
    try:
        with open(meta) as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return f"{META} is unreadable or truncated ({e})"
    for name in (".metadata", "trainer_state.pt"):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            return f"{name} is missing or empty"
    return None


def scan_checkpoints(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(complete `iter_*` names, oldest first; [(name, why it is incomplete)]) under root. The `latest` pointer
    is listed as incomplete when it names a checkpoint that is missing or incomplete."""
    if not root or not os.path.isdir(root):
        return [], []
    complete, incomplete = [], []
    for name in sorted(os.listdir(root), key=lambda n: (_step_of(n), n)):
        path = os.path.join(root, name)
        if name.startswith("iter_") and os.path.isdir(path):
            why = incomplete_reason(path)
            if why:
                incomplete.append((name, why))
            else:
                complete.append(name)
        elif name.startswith(".tmp-iter_") and os.path.isdir(path):
            incomplete.append((name, "a write that never finished (never renamed: that step was not saved)"))
    target = _pointer(root)
    if target is not None and target not in complete:
        state = "does not exist" if not os.path.isdir(os.path.join(root, target)) else "is incomplete"
        incomplete.append(("latest", f"names {target!r}, which {state}"))
    return complete, incomplete


def _pointer(root: str) -> Optional[str]:
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def latest_checkpoint(root: str) -> Optional[str]:
    """Newest complete checkpoint directory under root (the one `latest` names when that is complete), or None.
    An incomplete checkpoint is never returned."""
    complete, _ = scan_checkpoints(root)
    target = _pointer(root) if complete else None
    if target in complete:
        return os.path.join(root, target)
    return os.path.join(root, complete[-1]) if complete else None


def _describe(incomplete: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in incomplete)


def find_resume_checkpoint(root: str, allow_fresh_start: bool = False, log: bool = True) -> Optional[str]:
    """The checkpoint a resume loads, or None for a fresh start (an empty or missing directory, or one with only
    `.tmp-iter_*` leftovers). Raises ConfigError when the directory holds checkpoints but none is complete,
    unless allow_fresh_start (then it warns and returns None)."""
    complete, incomplete = scan_checkpoints(root)
    say = logger.warning if log and launch_rank() == 0 else (lambda *a: None)
    path = latest_checkpoint(root)
    if path is not None:
        if incomplete:
            say("checkpoint.dir=%r: resuming from %s; not usable: %s", root, os.path.basename(path),
                _describe(incomplete))
        return path
    blocking = [(n, why) for n, why in incomplete if not n.startswith(".tmp-")]
    if not blocking:
        if incomplete:
            say("checkpoint.dir=%r: no complete checkpoint, starting at step 0 (ignored: %s)", root,
                _describe(incomplete))
        return None
    if allow_fresh_start:
        say("checkpoint.dir=%r holds no complete checkpoint; starting at step 0 as checkpoint.allow_fresh_start "
            "asks. Incomplete (left in place; a save at the same step replaces it): %s", root, _describe(incomplete))
        return None
    raise ConfigError(
        f"checkpoint.dir={root!r} holds no complete checkpoint to resume from, only incomplete ones: "
        f"{_describe(incomplete)}. Starting at step 0 would discard them. Repair or move them away (a disk that "
        f"filled up? an interrupted copy?), or set checkpoint.allow_fresh_start=true to start at step 0 anyway "
        f"(or checkpoint.resume=false).")


def read_trainer_state(path: str) -> dict:
    """{'step', 'scheduler', 'extra'} of a complete checkpoint (small; JSON-safe tensors only)."""
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)


def check_resume_data(path: str, saved: Optional[dict], current: dict, allow_change: bool = False, log: bool = True):
    """Refuse (ConfigError) to resume the prompt position `saved` (a PromptSampler state from the checkpoint at
    `path`) on other train prompts than it was taken on (`current`: this run's sampler state)."""
    if not saved:
        return
    say = logger.warning if log and launch_rank() == 0 else (lambda *a: None)
    n_saved, n_now = int(saved["num_examples"]), int(current["num_examples"])
    if n_saved != n_now:
        raise ConfigError(
            f"cannot resume {path}: it was taken on {n_saved} train prompts, the data now gives {n_now}. The data "
            f"position cannot carry over to a dataset of another size"
            + (" (checkpoint.allow_data_change=true covers only a same-size change)" if allow_change else "")
            + ": use the data and prompt settings the run started with, or export the checkpoint "
              "(tools/convert_checkpoint.py mcore-to-hf) and start a new run in another checkpoint.dir from it.")
    old, new = saved.get("fingerprint"), current.get("fingerprint")
    if old and new and old != new:
        if allow_change:
            say("%s: the train prompts changed since this checkpoint (fingerprint %s -> %s); continuing at the saved "
                "position in the new data as checkpoint.allow_data_change asks", path, old, new)
            return
        raise ConfigError(
            f"cannot resume {path}: the train prompts changed since it was written (same count {n_now}, fingerprint "
            f"of the rendered prompts and reference answers {old} -> {new}; data files, data.* settings, tokenizer "
            f"or chat template). Resuming would continue with another prompt order. Use the original data, or set "
            f"checkpoint.allow_data_change=true to continue at the saved position in the new data.")
    if saved.get("shuffle", True) and "seed" in saved and int(saved["seed"]) != int(current["seed"]):
        # the same prompts (a data file's do not depend on data.seed), but the seed fixes their order
        if not allow_change:
            raise ConfigError(
                f"cannot resume {path}: it was taken with data.seed={saved['seed']}, this run sets data.seed="
                f"{current['seed']}. The seed fixes the train prompt order and the saved position is a place in the "
                f"old order (a new one would repeat some prompts and skip others): set data.seed={saved['seed']} "
                f"to resume, or checkpoint.allow_data_change=true to continue in the saved order.")
        say("%s: data.seed=%s here, but the checkpoint's prompt order (data.seed=%s) continues, as "
            "checkpoint.allow_data_change asks", path, current["seed"], saved["seed"])
    if not old or not new:
        say("%s: no train-prompt fingerprint to compare (a checkpoint written before they were saved); the "
            "train data is not checked on this resume", path)


def resume_checkpoint(ckpt_cfg, sampler_state: dict, optim, log: bool = True) -> Optional[str]:
    """What a run with checkpoint config `ckpt_cfg` (config.CheckpointConfig) resumes from, checked: None (fresh
    start) or a complete checkpoint in a format the installed megatron-core reads, whose train data matches
    `sampler_state` and whose LR schedule is `optim`'s (config.OptimConfig). Cheap and read-only; every rank calls
    it before any process group exists, so a refusal (ConfigError) ends every rank the same way."""
    if not ckpt_cfg.dir or not ckpt_cfg.resume:
        return None
    path = find_resume_checkpoint(ckpt_cfg.dir, ckpt_cfg.allow_fresh_start, log=log)
    if path is not None:
        check_readable(path, read_meta(path))
        state = read_trainer_state(path)
        check_resume_data(path, state.get("extra", {}).get("sampler"), sampler_state, ckpt_cfg.allow_data_change,
                          log=log)
        check_resume_schedule(path, state.get("scheduler"), optim)
    return path


# OptimizerParamScheduler state key -> the config key behind it (config.OptimConfig.lr_schedule)
_SCHEDULE_KEYS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_steps",
                  "lr_decay_steps": "optim.decay_steps (with optim.warmup_steps)",
                  "lr_decay_style": "optim.decay_style", "start_wd": "optim.weight_decay"}


def check_resume_schedule(path: str, saved: Optional[dict], optim) -> None:
    """Refuse (ConfigError) to resume a checkpoint whose LR / weight-decay schedule differs from this run's, which
    megatron-core would not follow: 0.16.1 silently keeps the checkpoint's schedule (OptimizerParamScheduler's
    use_checkpoint_opt_param_scheduler defaults to True, optimizer_param_scheduler.py:135 and :326; the distributed
    optimizer restores the saved param groups' max_lr / min_lr, distrib_optimizer.py:755-763), so the run would use
    other values than its config says; 0.19.2 keeps it too, and fails with a bare KeyError (ValueError without the
    distributed optimizer) when optim.lr or min_lr changed, because it matches saved param groups on max_lr /
    min_lr (optimizer/optimizer.py:139-148, distrib_optimizer.py:970). decay_steps is not compared under a constant
    schedule, where it has no effect."""
    if not saved:
        return
    want = optim.lr_schedule()
    constant = saved.get("lr_decay_style") == want["lr_decay_style"] == "constant"
    changed = [f"{key}: {saved[k]} in the checkpoint, {want[k]} in this run" for k, key in _SCHEDULE_KEYS.items()
               if k in saved and saved[k] != want[k] and not (constant and k == "lr_decay_steps")]
    if changed:
        raise ConfigError(
            f"cannot resume {path}: its LR schedule differs from this run's ({'; '.join(changed)}). megatron-core "
            "keeps a resumed optimizer's saved schedule (these settings would be ignored; 0.19 fails on a changed "
            "optim.lr / min_lr): set them back to resume, or export the checkpoint (tools/convert_checkpoint.py "
            "mcore-to-hf) and start a new run in another checkpoint.dir from it.")


def rotate_checkpoints(root: str, keep_last: int, keep: str = "") -> list[str]:
    """Remove all but the newest `keep_last` complete checkpoints (never `keep`, the one just written). Incomplete
    checkpoints are neither counted nor removed: they are named in a warning. Returns the removed names."""
    complete, incomplete = scan_checkpoints(root)
    removed = [name for name in complete[:-keep_last] if name != keep] if keep_last > 0 else []
    for name in removed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    leftovers = [(n, why) for n, why in incomplete if n != "latest"]
    if leftovers:
        logger.warning("checkpoint.dir=%r: left %d incomplete checkpoint(s) in place (not counted by "
                       "checkpoint.keep_last, never removed automatically): %s", root, len(leftovers),
                       _describe(leftovers))
    return removed


def read_meta(path: str) -> dict:
    why = incomplete_reason(path)
    if why:
        raise FileNotFoundError(f"{path} is not a complete megatron_bppo checkpoint ({why}); "
                                "pass a directory written by tools/convert_checkpoint.py or the trainer")
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def _unwrap(model):
    while hasattr(model, "module"):      # DDP / Float16Module wrappers
        model = model.module
    return model


def _model_state(models) -> dict:
    if len(models) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks per rank) are not supported")
    return {"model": _unwrap(models[0]).sharded_state_dict(prefix="")}


def save_checkpoint(root: str, step: int, models, optimizer=None, scheduler=None, hf_source_dir: str = "",
                    extra_state: Optional[dict] = None, keep_last: int = 0,
                    optimizer_format: str = "dp_reshardable") -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ConfigError(f"checkpoint.optimizer_format={optimizer_format!r}: must be one of "
                          f"{', '.join(OPTIMIZER_FORMATS)}")
    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    metadata = _optim_metadata(optimizer_format)
    name = checkpoint_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, ".tmp-" + name)
    if launch_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)            # empty: megatron-core warns "Overwriting old incomplete / corrupted checkpoint"
    _barrier()                      # into a non-empty one (serialization.py:383-387, 0.16.1)
    state = _model_state(models)
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=metadata)
    # synchronous save, without megatron-core's per-rank multiprocessing Manager (it would outlive a killed rank)
    with in_process_save_results_queue():
        dist_checkpointing.save(state, tmp, content_metadata=metadata)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, "rng", f"rank_{launch_rank():05d}.pt"))
    _barrier()
    if launch_rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                    "extra": extra_state or {}}, os.path.join(tmp, "trainer_state.pt"))
        if hf_source_dir:
            os.makedirs(os.path.join(tmp, "hf"), exist_ok=True)
            copy_hf_side_files(hf_source_dir, os.path.join(tmp, "hf"))
            shutil.copy2(os.path.join(hf_source_dir, "config.json"), os.path.join(tmp, "hf", "config.json"))
        meta = {"step": step, "has_optimizer": optimizer is not None, "optimizer_format": optimizer_format,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, "layout": layout,
                "megatron_core": megatron_core_version()}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(final):
            why = incomplete_reason(final)
            if why:
                logger.warning("replacing the incomplete checkpoint %s (%s) with a complete one", final, why)
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        rotate_checkpoints(root, keep_last, keep=name)
    _barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads its `.metadata` file with plain pickle (torch 2.13 filesystem.py:930).
    Unpickle it first with an allow-list of the classes DCP metadata is made of, so a tampered checkpoint
    is refused instead of running code."""

    def find_class(self, module, name):
        torch_names = {"Size", "strided", "sparse_coo"} | {n for n in dir(torch)
                                                            if isinstance(getattr(torch, n, None), torch.dtype)}
        if module.startswith("torch.distributed.checkpoint.") or (module == "torch" and name in torch_names) \
                or (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def verify_checkpoint_safe(path: str):
    metadata = os.path.join(path, ".metadata")
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no .metadata: the checkpoint is incomplete or not torch_dist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: its .metadata references {e}, which a torch_dist checkpoint "
                         "never contains (it could run code on load)") from None


def load_checkpoint(path: str, models, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Collective: load model (+ optimizer, scheduler, RNG) from `path` into the current layout.
    Returns {'step': int, 'extra': dict, 'meta': dict}."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    meta = read_meta(path)
    verify_checkpoint_safe(path)
    check_readable(path, meta)
    state = _model_state(models)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{path} holds no optimizer state (a converted model checkpoint?): load it with "
                             "optimizer=None, i.e. as initial weights")
        fmt = check_optimizer_layout(path, meta, ps.get_tensor_model_parallel_world_size(),
                                     ps.get_pipeline_model_parallel_world_size())
        ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True,
                                                          metadata=_optim_metadata(fmt))
    loaded = dist_checkpointing.load(state, path)
    _unwrap(models[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if scheduler is not None and trainer_state.get("scheduler"):
        scheduler.load_state_dict(trainer_state["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = os.path.join(path, "rng", f"rank_{launch_rank():05d}.pt")
    if load_rng and meta.get("world_size") == world and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": trainer_state["step"], "extra": trainer_state.get("extra", {}), "meta": meta}
