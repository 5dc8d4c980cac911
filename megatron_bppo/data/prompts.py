"""Config -> rendered train and held-out prompts: the one way the trainer, bench/ and tools/ get their prompts.

    data.train / data.eval --(open_dataset: "arithmetic:<preset>" generated, or a jsonl / parquet file)--> examples
    examples --(prompt_format: instruction by name or literal text, system prompt, chat template, prompt budget =
                min(rollout.max_model_len, learner.max_seq_len) - sampling.max_tokens, data.on_too_long)
             --> RenderedPrompt
    prompts_from_config(cfg, tokenizer) -> (train prompts, held-out prompts[:data.eval_size])
    held_out_prompts(cfg, tokenizer, source, size) -> the held-out prompts of any source (megatron-bppo eval)
    prompts_fingerprint(train prompts) -> what a checkpoint's data position means (checked on resume)

A generated task's held-out prompts are its test split (seeded with data.seed + 1); a file-based train set needs
data.eval. Every problem a user can cause here is a ConfigError that names the key to change.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter
from typing import Optional, Sequence

from ..errors import ConfigError
from ..seeds import HELD_OUT_SEED_OFFSET
from .arithmetic import generate_arithmetic
from .chat import INSTRUCTIONS, ChatFormat, ChatTemplateError, PromptRenderer, PromptTooLongError, RenderedPrompt
from .datasets import DatasetError, PromptDataset, read_prompt_file

__all__ = ["open_dataset", "prompt_format", "render_prompts", "prompts_from_config", "held_out_prompts",
           "prompts_fingerprint"]

def open_dataset(source: str | os.PathLike, *, split: str = "train", seed: int = 0, size: Optional[int] = None,
                 schema: str = "auto", heldout_fraction: float = 0.2) -> PromptDataset:
    """One entry point for a config value: ``"arithmetic:<preset>"`` (e.g. ``arithmetic:l0_l5_mix``; ``size``
    problems, default 1024, of ``split`` "train"/"test", seeded) or a dataset path (``size`` = row limit;
    ``split``/``seed`` unused: a file is its own split)."""
    src = str(source)
    if src == "arithmetic" or src.startswith("arithmetic:"):
        level = src.partition(":")[2] or "l0"
        return generate_arithmetic(level, size or 1024, split=split, seed=seed, heldout_fraction=heldout_fraction)
    return read_prompt_file(src, schema=schema, limit=size)


def prompt_budget(cfg) -> int:
    """Most prompt tokens: prompt + a full response must fit the engine's context and the learner's sequences."""
    return min(cfg.rollout.max_model_len, cfg.learner.max_seq_len) - cfg.sampling.max_tokens


def prompt_format(cfg) -> ChatFormat:
    """`cfg`: config.Config (data.*, rollout.max_model_len, sampling.max_tokens) -> the chat rendering rules."""
    data = cfg.data
    name = data.instruction
    instruction = INSTRUCTIONS.get(name, None if name == "none" else name)
    return ChatFormat(system_prompt=data.system_prompt,
                      instruction_prefix=instruction if data.instruction_position == "prefix" else None,
                      instruction_suffix=instruction if data.instruction_position == "suffix" else None,
                      max_prompt_tokens=prompt_budget(cfg),
                      on_too_long=data.on_too_long)


def render_prompts(cfg, tokenizer, examples) -> list[RenderedPrompt]:
    try:
        rendered = PromptRenderer(tokenizer, prompt_format(cfg)).render_all(examples)
    except PromptTooLongError as e:
        raise ConfigError(f"{e}: the prompt budget is min(rollout.max_model_len, learner.max_seq_len) - "
                          "sampling.max_tokens; raise those limits, lower sampling.max_tokens, or set "
                          "data.on_too_long=skip") from None
    except ChatTemplateError as e:
        raise ConfigError(f"data: {e}") from None
    if not rendered:
        raise ConfigError("no prompt fits min(rollout.max_model_len, learner.max_seq_len) - sampling.max_tokens")
    return rendered


def prompts_from_config(cfg, tokenizer) -> tuple[list[RenderedPrompt], list[RenderedPrompt]]:
    """(train prompts, held-out prompts) as the trainer uses them."""
    data = cfg.data
    generated = data.train.startswith("arithmetic")
    try:
        train = open_dataset(data.train, split="train", seed=data.seed, size=data.train_size)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    eval_source = data.eval or (data.train if generated else "")
    if not eval_source:
        raise ConfigError("data.eval is empty: give a held-out prompt file (only generated tasks have "
                          "a built-in test split)")
    held_out = held_out_prompts(cfg, tokenizer, eval_source, data.eval_size)
    repeated = sorted(i for i, n in Counter(e.id for e in train).items() if n > 1)[:5]
    if repeated:
        raise ConfigError(f"data.train={data.train!r}: prompt ids repeat ({repeated}); give every row a unique id")
    train_prompts = render_prompts(cfg, tokenizer, train)
    if data.prompts_per_step > len(train_prompts):
        raise ConfigError(f"data.prompts_per_step={data.prompts_per_step} but data.train has only "
                          f"{len(train_prompts)} usable prompts: lower it or use a larger dataset")
    return train_prompts, held_out


def held_out_prompts(cfg, tokenizer, source: str, size: Optional[int]) -> list[RenderedPrompt]:
    """Rendered held-out prompts of `source` (a generated task: its test split, seeded with data.seed + 1 and
    `size` problems; a file: its first `size` rows, all when None), as the trainer's evaluation renders them."""
    try:
        examples = open_dataset(source, split="test", seed=cfg.data.seed + HELD_OUT_SEED_OFFSET, size=size)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    rendered = render_prompts(cfg, tokenizer, examples)
    return rendered[:size] if size else rendered


def prompts_fingerprint(prompts: Sequence) -> str:
    """A short hash of rendered prompts in order: each one's token ids and reference answer (``RenderedPrompt``:
    ``.token_ids``, ``.example.reference``). It changes with the data, the prompt settings, the tokenizer and the
    chat template: everything that decides what a sampler index means. Cheap (~10 ms per 10k prompts)."""
    h = hashlib.sha256(str(len(prompts)).encode())
    for p in prompts:
        ids = array("q", p.token_ids).tobytes()
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids)
        ref = str(p.example.reference).encode()
        h.update(len(ref).to_bytes(8, "little"))
        h.update(ref)
    return h.hexdigest()[:16]
