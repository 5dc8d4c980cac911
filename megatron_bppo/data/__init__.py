"""Prompt data: datasets (jsonl / parquet / GSM8K / MATH / verl schemas), the generated arithmetic task, chat rendering.

    train, held_out = prompts_from_config(cfg, tokenizer)  # what the trainer, bench/ and tools/ use (prompts.py)
    ds = open_dataset("data/gsm8k/train.jsonl")            # or "arithmetic:l0" (generated); ds.report.summary()
    sampler = PromptSampler(len(ds), seed=0)               # sampler.next_indices(16); state_dict() for checkpoints
    prompts = PromptRenderer(tokenizer, ChatFormat(instruction_prefix=DIRECT_INSTRUCTION)).render_all(ds)
"""
from megatron_bppo.data.datasets import (SCHEMAS, DatasetError, LoadReport, PromptDataset, PromptExample,
                                         PromptSampler, read_prompt_file, read_rows, write_prompts_jsonl,
                                         write_verl_parquet)
from megatron_bppo.data.arithmetic import (PRESETS, ArithmeticLevel, ArithmeticMixture, generate_arithmetic,
                                           get_preset, problem_split)
from megatron_bppo.data.chat import (BOXED_INSTRUCTION, COT_INSTRUCTION, DIRECT_INSTRUCTION, GSM8K_INSTRUCTION,
                                     INSTRUCTIONS, ChatFormat, ChatTemplateError, PromptRenderer, PromptTooLongError,
                                     RenderedPrompt, build_messages)
from megatron_bppo.data.prompts import (held_out_prompts, open_dataset, prompt_format, prompts_fingerprint,
                                        prompts_from_config, render_prompts)

__all__ = [
    "ArithmeticLevel", "ArithmeticMixture", "BOXED_INSTRUCTION", "COT_INSTRUCTION", "ChatFormat",
    "ChatTemplateError", "DIRECT_INSTRUCTION", "DatasetError", "GSM8K_INSTRUCTION", "INSTRUCTIONS", "LoadReport",
    "PRESETS", "PromptDataset", "PromptExample", "PromptRenderer", "PromptSampler", "PromptTooLongError",
    "RenderedPrompt", "SCHEMAS", "build_messages", "generate_arithmetic", "get_preset", "held_out_prompts",
    "open_dataset",
    "problem_split", "prompt_format", "prompts_fingerprint", "prompts_from_config", "read_prompt_file", "read_rows",
    "render_prompts",
    "write_prompts_jsonl", "write_verl_parquet",
]
