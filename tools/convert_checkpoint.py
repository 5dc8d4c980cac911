"""Convert checkpoints between Hugging Face and Megatron (torch_dist) formats.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir H --out-dir M --tp T --pp P
    python tools/convert_checkpoint.py mcore-to-hf --ckpt-dir M --out-dir H2 [--tp T --pp P]

Run under `torchrun --nproc-per-node T*P` when T*P > 1. The Megatron checkpoint is layout-free: one
written at TP2 loads at TP1, PP2, ... M may also be a training run's checkpoint root (its latest complete
checkpoint is used). H2 holds safetensors, config, generation config and tokenizer.
A vocabulary that TP does not divide is padded in Megatron (128 * TP rows, model/bridge.py padded_vocab_size) and
the padding is never written to H2; a Megatron checkpoint padded for one TP loads at another.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bppo.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_bppo.errors import ConfigError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF checkpoint directory -> Megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out-dir", required=True)
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF checkpoint directory")
    b.add_argument("--ckpt-dir", required=True)
    b.add_argument("--out-dir", required=True)
    for s in (a, b):
        s.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: world size / pp)")
        s.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--trust-remote-code", action="store_true")
    return p


def _layout(args) -> ParallelConfig:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    tp = args.tp if args.tp is not None else max(world // args.pp, 1)
    if tp * args.pp != world:
        raise ConfigError(f"--tp {tp} x --pp {args.pp} = {tp * args.pp} processes, but {world} were launched: "
                          f"run under `torchrun --nproc-per-node {tp * args.pp}`")
    return ParallelConfig(tp=tp, pp=args.pp)


def _checkpoint(ckpt_dir: str) -> str:
    """--ckpt-dir: one complete checkpoint, or a training run's checkpoint root (its latest complete one)."""
    from megatron_bppo.checkpointing import incomplete_reason, latest_checkpoint, scan_checkpoints

    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--ckpt-dir {ckpt_dir!r} is not a directory: pass a checkpoint written by this tool "
                          "or the trainer (or a run's checkpoint.dir)")
    if incomplete_reason(ckpt_dir) is None:
        return ckpt_dir
    latest = latest_checkpoint(ckpt_dir)
    if latest:
        return latest
    _, incomplete = scan_checkpoints(ckpt_dir)
    found = ("; it holds only incomplete checkpoints: " + "; ".join(f"{n}: {why}" for n, why in incomplete)
             if incomplete else f" ({incomplete_reason(ckpt_dir)})")
    raise ConfigError(f"--ckpt-dir {ckpt_dir!r} is not a complete megatron_bppo checkpoint nor a directory of "
                      f"them{found}")


def _claim_out_dir(out_dir: str):
    """hf-to-mcore's --out-dir: refused when it holds checkpoints (the step-0 checkpoint would become its `latest`,
    and a run resuming from that directory would restart at step 0), then locked like a training run's
    checkpoint.dir (refused while a live run holds it; released at exit)."""
    from megatron_bppo.checkpointing import scan_checkpoints
    from megatron_bppo.run_lock import check_checkpoint_lock, take_checkpoint_lock

    complete, incomplete = scan_checkpoints(out_dir)
    if complete or incomplete:
        names = complete + [name for name, _ in incomplete]
        raise ConfigError(f"--out-dir {out_dir!r} already holds checkpoints ({', '.join(names[:4])}"
                          f"{', ...' if len(names) > 4 else ''}): writing a step-0 checkpoint there would become its "
                          f"latest; pass a new or empty directory")
    check_checkpoint_lock(out_dir)
    take_checkpoint_lock(out_dir)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_bppo.checkpointing import load_checkpoint, save_checkpoint
    from megatron_bppo.distributed import destroy_distributed, print_rank0
    from megatron_bppo.model.bridge import open_model, read_hf_config

    start = time.time()
    parallel = _layout(args)
    if args.direction == "hf-to-mcore":
        source = args.hf_dir
        hf_config = read_hf_config(source, args.trust_remote_code, label=f"--hf-dir {source!r}")
        _claim_out_dir(args.out_dir)
    else:
        ckpt = _checkpoint(args.ckpt_dir)
        source = os.path.join(ckpt, "hf")
        hf_config = read_hf_config(source, args.trust_remote_code, require_weights=False,
                                   label=f"--ckpt-dir {args.ckpt_dir!r} (its checkpoint's hf/ directory {source!r})")
    model = ModelConfig(path=source, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    _, bridge = open_model(model, parallel, require_weights=args.direction == "hf-to-mcore", hf_config=hf_config)
    print_rank0(f"[convert] {args.direction}: {hf_config.model_type}, {hf_config.num_hidden_layers} layers, "
                f"TP={parallel.tp} PP={parallel.pp}")
    if bridge.padded_vocab_size != bridge.vocab_size:
        print_rank0(f"[convert] vocabulary {bridge.vocab_size} padded to {bridge.padded_vocab_size} for TP="
                    f"{parallel.tp} (Megatron's rule); HF output carries the {bridge.vocab_size} real rows only")
    models = bridge.build(load_weights=args.direction == "hf-to-mcore")
    print_rank0(f"[convert] model built in {time.time() - start:.1f}s")
    if args.direction == "hf-to-mcore":
        out = save_checkpoint(args.out_dir, 0, models, hf_source_dir=source)
        print_rank0(f"[convert] wrote Megatron checkpoint {out} in {time.time() - start:.1f}s")
    else:
        load_checkpoint(ckpt, models, load_rng=False)
        print_rank0(f"[convert] loaded {ckpt} in {time.time() - start:.1f}s")
        count = [0]

        def progress(name, tensor):
            count[0] += 1
            if count[0] % 20 == 1:
                print_rank0(f"[convert] {count[0]:5d} {name} {tuple(tensor.shape)}")

        bridge.save_hf(models, args.out_dir, progress=progress)
        print_rank0(f"[convert] wrote {count[0]} tensors to {args.out_dir} in {time.time() - start:.1f}s")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
