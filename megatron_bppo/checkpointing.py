"""Megatron distributed checkpoints: save atomically, find the latest complete one, load at any TP/PP.

    <root>/iter_0000010/            one complete checkpoint
        *.distcp, .metadata, ...    model (+ optimizer) in megatron-core's torch_dist format (layout-free)
        hf/                         HF config, tokenizer, generation config (for export back to HF)
        trainer_state.pt            step, LR-scheduler state, caller's extra state (data position, ...)
        rng/rank_00000.pt           per-rank RNG states (restored when the world size matches)
        megatron_bppo.json          written last: its presence marks the checkpoint complete
    <root>/latest                   name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into `.tmp-iter_XXXXXXX` and renamed after every rank has finished, so a crash
during a write never leaves a directory that `latest_checkpoint` would pick. Everything is loaded with
`torch.load(weights_only=True)` or JSON: a checkpoint cannot run code on load.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .model.bridge import copy_hf_side_files
from .platform.cpu_compat import ensure_optimizer_state

META = "megatron_bppo.json"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}   # the only format that reshards here


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def latest_checkpoint(root: str) -> Optional[str]:
    """Newest complete checkpoint directory under root, or None."""
    if not root or not os.path.isdir(root):
        return None
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidate = os.path.join(root, f.read().strip())
        if is_complete(candidate):
            return candidate
    done = sorted(d for d in os.listdir(root) if d.startswith("iter_") and is_complete(os.path.join(root, d)))
    return os.path.join(root, done[-1]) if done else None


def read_meta(path: str) -> dict:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete megatron_bppo checkpoint (no {META}); "
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
                    extra_state: Optional[dict] = None, keep_last: int = 0, layout: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    name = checkpoint_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, ".tmp-" + name)
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    state = _model_state(models)
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIM_METADATA)
    dist_checkpointing.save(state, tmp, content_metadata=OPTIM_METADATA)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                    "extra": extra_state or {}}, os.path.join(tmp, "trainer_state.pt"))
        if hf_source_dir:
            os.makedirs(os.path.join(tmp, "hf"), exist_ok=True)
            copy_hf_side_files(hf_source_dir, os.path.join(tmp, "hf"))
            shutil.copy2(os.path.join(hf_source_dir, "config.json"), os.path.join(tmp, "hf", "config.json"))
        meta = {"step": step, "has_optimizer": optimizer is not None,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, "layout": layout or {}}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        if keep_last > 0:
            done = sorted(d for d in os.listdir(root) if d.startswith("iter_"))
            for old in done[:-keep_last]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads its `.metadata` file with plain pickle (torch 2.13 filesystem.py:930).
    Unpickle it first with an allow-list of the classes DCP metadata is made of, so a tampered checkpoint
    is refused instead of running code."""

    def find_class(self, module, name):
        torch_names = {"Size", "strided", "sparse_coo"} | {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
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

    meta = read_meta(path)
    verify_checkpoint_safe(path)
    state = _model_state(models)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{path} holds no optimizer state (a converted model checkpoint?): load it with "
                             "optimizer=None, i.e. as initial weights")
        ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True,
                                                          metadata=OPTIM_METADATA)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(models[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if scheduler is not None and trainer_state.get("scheduler"):
        scheduler.load_state_dict(trainer_state["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if load_rng and meta.get("world_size") == world and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": trainer_state["step"], "extra": trainer_state.get("extra", {}), "meta": meta}
