"""Deterministic tiny tokenizers and HF checkpoints for tests and CI (offline, CPU, seconds).

* :func:`train_tiny_tokenizer` trains a byte-level BPE on a generated corpus (arithmetic word problems,
  digits, English words) with ChatML special tokens and chat template, and saves it with ``save_pretrained``.
* :func:`make_tiny_checkpoint` builds a random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` whose every parameter
  (norms and biases included) is re-drawn from a seeded generator, so that weight-mapping errors show up as
  logit differences. It saves safetensors + config + generation_config + tokenizer in one directory.
  Results are cached (:mod:`megatron_bppo.model.cache`): a marker file holds the hash of the arguments and the
  list of files; a complete directory with the same hash is returned at once. Directories are built in a
  temporary sibling and renamed into place, so an interrupted build never leaves a half directory that looks
  complete.
* :func:`tiny_checkpoint_cache` picks a directory under a root, keyed by the arguments, and builds it there.
* :data:`TINY_PADDED_VOCAB` and :data:`TINY_LLAMA3_ROPE`: arguments for the two checkpoint kinds people train that
  need more than a plain mapping: a vocabulary no TP divides (added tokens, like 32001) and Llama 3.x rope scaling
  with an original context short enough that the scaling changes every position's rotary frequencies.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

from megatron_bppo.model.cache import (
    args_hash,
    check_replaceable,
    fix_permissions,
    is_complete,
    new_tmp_dir,
    portable_tokenizer_class,
    publish_dir,
    write_marker,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_LLAMA3_ROPE",
    "TINY_PADDED_VOCAB",
    "make_tiny_checkpoint",
    "tiny_checkpoint_cache",
    "tiny_corpus",
    "train_tiny_tokenizer",
]

# Ids 0, 1, 2 in this order, as in SmolLM2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Plain ChatML (Qwen2/SmolLM2 style, without a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

_NAMES = ["Tom", "Anna", "Lily", "Omar", "Ben", "Sara", "Max", "Mia", "Leo", "Ava", "Noah", "Emma", "Ravi", "Yuki"]
_ITEMS = ["apples", "books", "pencils", "cookies", "marbles", "stickers", "coins", "cards", "eggs", "flowers",
          "cars", "shells", "boxes", "cups", "oranges", "candies"]
_WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three number answer question problem solve step total each more less left "
    "buys gives finds loses eats sells shares equal sum difference product quotient remainder twice half double "
    "triple four five six seven eight nine ten hundred thousand zero plus minus times divided multiply add "
    "subtract think reason check final result correct wrong please assistant user system helpful"
).split()


def tiny_corpus(n_problems: int = 1500, seed: int = 1234) -> list[str]:
    """A deterministic generated corpus: word problems with worked answers, bare arithmetic, digit runs,
    English filler and chat-like lines. About 200 KB with the defaults."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_problems):
        name, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = i % 4
        if kind == 0:
            q = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
            r = f"{name} has {a} + {b} = {a + b} {item}. The answer is \\boxed{{{a + b}}}."
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q = f"{name} had {a} {item} and gave {b} to {other}. How many {item} are left?"
            r = f"{a} - {b} = {a - b}. {name} has {a - b} {item} left. #### {a - b}"
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 30)
            q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
            r = f"<think>{a} * {b} = {a * b}</think> There are {a * b} {item}. Answer: {a * b}"
        else:
            b = rng.randint(2, 12)
            a = b * rng.randint(2, 20)
            q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
            r = f"{a} / {b} = {a // b}. Each friend gets {a // b} {item}. The final answer is {a // b}."
        lines.append(f"Question: {q}\nAnswer: {r}")
        lines.append(f"user\n{q}\nassistant\n{r}")
        x, y = rng.randint(0, 9999), rng.randint(0, 9999)
        op = rng.choice(["+", "-", "*"])
        val = x + y if op == "+" else x - y if op == "-" else x * y
        lines.append(f"{x} {op} {y} = {val}; {x}{op}{y}={val}")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))).capitalize() + ".")
    lines.append(" ".join(str(d) for d in range(10)) + " " + "".join(str(d) for d in range(10)))
    lines.append("You are a helpful assistant. Please reason step by step, and put your final answer in \\boxed{}.")
    return lines


def train_tiny_tokenizer(out_dir: str | os.PathLike | None, vocab_size: int = 512, *, model_max_length: int = 512):
    """Train a byte-level BPE (``tokenizers``) on :func:`tiny_corpus`, wrap it as a ``PreTrainedTokenizerFast`` with
    ChatML special tokens (``<|endoftext|>``=0 = pad, ``<|im_start|>``=1, ``<|im_end|>``=2 = eos; no BOS is added)
    and a ChatML ``chat_template``; save it to ``out_dir`` (skipped when ``out_dir`` is None) and return it.

    Deterministic: the same ``vocab_size`` gives the same vocabulary and merges. Digits are split one per token
    (as in Qwen2/SmolLM2). ``len(tokenizer) == vocab_size`` for sizes the corpus supports (up to a few thousand).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
        portable_tokenizer_class(Path(out_dir))
    return fast


# ---------------------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------------------

_ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def _norm_dtype(dtype) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


# A Llama with an odd vocabulary (509 = 512 - 3: "added tokens"; TP2 does not divide it, Megatron pads it to 512).
TINY_PADDED_VOCAB = dict(arch="llama", tie_word_embeddings=False, vocab_size=509)
# Llama 3.x rope scaling as in Llama-3.1's config.json, with original_max_position_embeddings=64 so that with
# head_dim 32 all but the 3 fastest of 16 rotary frequencies are scaled; tied, with a vocabulary (600) that
# Megatron pads to 640 at TP1 but 768 at TP2 (a checkpoint moved between the two layouts changes padding).
TINY_LLAMA3_ROPE = dict(arch="llama", tie_word_embeddings=True, vocab_size=600, max_position_embeddings=512,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


def _checkpoint_args(arch, tie_word_embeddings, hidden, layers, heads, kv_heads, head_dim, intermediate,
                     vocab_size, max_position_embeddings, seed, dtype, rope_scaling=None) -> dict[str, Any]:
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    args = dict(arch=arch, tie_word_embeddings=bool(tie_word_embeddings), hidden=int(hidden), layers=int(layers),
                heads=int(heads), kv_heads=int(kv_heads), head_dim=int(head_dim), intermediate=int(intermediate),
                vocab_size=int(vocab_size), max_position_embeddings=int(max_position_embeddings), seed=int(seed),
                dtype=_norm_dtype(dtype))
    if rope_scaling:            # only when set: the hash (and cache directory) of unscaled checkpoints is unchanged
        if "rope_type" not in rope_scaling:
            raise ValueError(f"rope_scaling needs a rope_type: {rope_scaling}")
        args["rope_scaling"] = {k: rope_scaling[k] for k in sorted(rope_scaling)}
    return args


def _redraw_(model, seed: int, std: float = 0.05) -> None:
    """Re-draw every parameter from a seeded generator: matrices and biases ~ N(0, std), norm weights ~ U(0.8, 1.2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # tied params appear once
            if "norm" in name:
                val = 1.0 + 0.4 * (torch.rand(p.shape, generator=g, dtype=torch.float32) - 0.5)
            else:
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            p.copy_(val.to(p.dtype))


def make_tiny_checkpoint(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    tie_word_embeddings: bool = False,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    intermediate: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype="float32",
    rope_scaling: dict | None = None,
) -> Path:
    """Build (or reuse) a random tiny HF checkpoint in ``out_dir`` and return ``Path(out_dir)``.

    ``arch``: ``"llama"`` (no biases) or ``"qwen2"`` (q/k/v biases). Every parameter is re-drawn from ``seed``
    (N(0, 0.05) for matrices/biases, U(0.8, 1.2) for RMSNorm weights), so mapping mistakes change the logits.
    The directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (no ``lm_head.weight``
    when tied), and the tokenizer from :func:`train_tiny_tokenizer` (``tokenizer.json``, ``tokenizer_config.json``,
    chat template). The model's ``vocab_size`` is ``max(vocab_size, len(tokenizer))`` (equal for the defaults).
    Token ids: bos = pad = ``<|endoftext|>`` (0), eos = ``<|im_end|>`` (2).
    ``rope_scaling``: e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``; config.json then carries
    ``rope_scaling`` and ``rope_theta`` as Llama-3.1's does (the transformers 4 layout, which transformers 5 and vLLM
    read), not transformers 5's ``rope_parameters``.

    Idempotent: when ``out_dir`` already holds a complete build with the same arguments (marker file
    ``.megatron_bppo_complete.json`` with the argument hash), it returns at once. A build with other arguments is
    replaced; a non-empty directory without a marker is never touched (``FileExistsError``).
    """
    args = _checkpoint_args(arch, tie_word_embeddings, hidden, layers, heads, kv_heads, head_dim, intermediate,
                            vocab_size, max_position_embeddings, seed, dtype, rope_scaling)
    h = args_hash("tiny_checkpoint", args)
    out = Path(out_dir).absolute()
    if is_complete(out, "tiny_checkpoint", h):
        return out
    check_replaceable(out)

    import torch
    import transformers
    from transformers import GenerationConfig

    tmp = new_tmp_dir(out)
    try:
        tokenizer = train_tiny_tokenizer(tmp, vocab_size=args["vocab_size"],
                                         model_max_length=args["max_position_embeddings"])
        model_vocab = max(args["vocab_size"], len(tokenizer))
        if model_vocab % 64 and model_vocab != args["vocab_size"]:
            model_vocab += 64 - model_vocab % 64
        pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        cfg_cls_name, model_cls_name = _ARCHS[arch]
        cfg_kw = dict(
            vocab_size=model_vocab,
            hidden_size=args["hidden"],
            intermediate_size=args["intermediate"],
            num_hidden_layers=args["layers"],
            num_attention_heads=args["heads"],
            num_key_value_heads=args["kv_heads"],
            head_dim=args["head_dim"],
            max_position_embeddings=args["max_position_embeddings"],
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            hidden_act="silu",
            tie_word_embeddings=args["tie_word_embeddings"],
            bos_token_id=pad_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            use_cache=True,
        )
        if args.get("rope_scaling"):
            cfg_kw["rope_scaling"] = dict(args["rope_scaling"])
        if arch == "llama":
            cfg_kw.update(attention_bias=False, mlp_bias=False)
        else:
            cfg_kw.update(use_sliding_window=False, sliding_window=None, max_window_layers=args["layers"])
        config = getattr(transformers, cfg_cls_name)(**cfg_kw)
        torch_dtype = getattr(torch, args["dtype"])
        model = getattr(transformers, model_cls_name)(config).to(torch_dtype)
        _redraw_(model, args["seed"])
        if args["tie_word_embeddings"]:
            model.tie_weights()
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
        )
        model.save_pretrained(str(tmp), **_safe_kw(model))
        if args.get("rope_scaling"):
            _write_rope_scaling_as_released(tmp / "config.json")
        fix_permissions(tmp)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained did not write model.safetensors in {tmp}")
        write_marker(tmp, "tiny_checkpoint", h, args, {"model_vocab_size": model_vocab,
                                                        "tokenizer_len": len(tokenizer)})
        return publish_dir(tmp, out, lambda p: is_complete(p, "tiny_checkpoint", h))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_rope_scaling_as_released(config_path: Path) -> None:
    """transformers 5 saves `rope_parameters` (theta inside); released Llama 3.x checkpoints carry `rope_scaling`
    and `rope_theta`: rewrite config.json that way so the tests read what users' checkpoints hold."""
    import json

    cfg = json.loads(config_path.read_text())
    params = cfg.pop("rope_parameters", None)
    if params is not None:
        params = dict(params)
        cfg["rope_theta"] = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        cfg["rope_scaling"] = params
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _safe_kw(model) -> dict:
    """transformers 4.x needs safe_serialization=True; 5.x always writes safetensors and dropped the flag."""
    import inspect

    params = inspect.signature(model.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def tiny_checkpoint_cache(root: str | os.PathLike, **kw) -> Path:
    """Build (or reuse) ``make_tiny_checkpoint(dir, **kw)`` in ``dir = root/tiny-<arch>-<tied|untied>-<hash12>``,
    where the hash covers all (defaulted) arguments; return ``dir``. Different arguments never share a directory."""
    import inspect

    sig = inspect.signature(make_tiny_checkpoint)
    bound = sig.bind(None, **kw)
    bound.apply_defaults()
    full = dict(bound.arguments)
    full.pop("out_dir")
    args = _checkpoint_args(**full)
    h = args_hash("tiny_checkpoint", args)
    name = f"tiny-{args['arch']}-{'tied' if args['tie_word_embeddings'] else 'untied'}-{h[:12]}"
    return make_tiny_checkpoint(Path(root) / name, **full)
