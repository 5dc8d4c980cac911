"""Prompt rendering: ``PromptExample`` -> chat messages -> the tokenizer's chat template -> text and token ids.

    fmt = ChatFormat(instruction_prefix=DIRECT_INSTRUCTION, max_prompt_tokens=256)
    renderer = PromptRenderer(tokenizer, fmt)
    prompts = renderer.render_all(dataset)          # at start-up: every too-long prompt is found before any work

Messages: ``[system?] + user(instruction_prefix + sep + question + sep + instruction_suffix)``. ``system_prompt``
None leaves the system turn to the template (SmolLM2's template then adds its default system prompt). For an
example that already has messages (verl parquet), the system prompt is added only if the chat has none, and
prefix/suffix go around the last user message's content.

Text: ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``; token ids:
``tokenizer(text, add_special_tokens=False)`` (the template carries any BOS). ``use_chat_template=False`` (base
models without a template) joins the system prompt and the user content with blank lines and lets the tokenizer
add its special tokens.

Too long (more than ``max_prompt_tokens``): ``on_too_long="error"`` raises :class:`PromptTooLongError` naming the
example and the numbers; ``"skip"`` drops it and counts it in ``num_too_long``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from megatron_bppo.data.datasets import DatasetError, PromptExample

__all__ = [
    "BOXED_INSTRUCTION",
    "COT_INSTRUCTION",
    "ChatFormat",
    "ChatTemplateError",
    "DIRECT_INSTRUCTION",
    "GSM8K_INSTRUCTION",
    "INSTRUCTIONS",
    "PromptRenderer",
    "PromptTooLongError",
    "RenderedPrompt",
    "build_messages",
]

logger = logging.getLogger(__name__)

# Instructions by name (config data.instruction); DIRECT / COT were calibrated on SmolLM2-135M-Instruct.
DIRECT_INSTRUCTION = "Solve the problem. Put the final answer after '####'."
COT_INSTRUCTION = "Think step by step, then give the final answer after ####."
# verl's GSM8K suffix and the usual Qwen2.5-Math suffix.
GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTIONS = {"direct": DIRECT_INSTRUCTION, "cot": COT_INSTRUCTION, "gsm8k": GSM8K_INSTRUCTION,
                "boxed": BOXED_INSTRUCTION}


class PromptTooLongError(DatasetError):
    """A rendered prompt has more tokens than allowed."""


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chat messages."""


@dataclass
class ChatFormat:
    system_prompt: Optional[str] = None        # None: the template's default (if any)
    instruction_prefix: Optional[str] = None   # text before the question
    instruction_suffix: Optional[str] = None   # text after the question
    separator: str = "\n"                      # between prefix, question and suffix
    use_chat_template: bool = True
    max_prompt_tokens: Optional[int] = None    # None: no check
    on_too_long: str = "error"                 # error | skip

    def __post_init__(self):
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long={self.on_too_long!r}: choose 'error' or 'skip'")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens}: must be > 0 or None")


@dataclass
class RenderedPrompt:
    example: PromptExample
    text: str
    token_ids: list[int]


def _wrap(content: str, fmt: ChatFormat) -> str:
    parts = [p for p in (fmt.instruction_prefix, content, fmt.instruction_suffix) if p]
    return fmt.separator.join(parts)


def build_messages(example: PromptExample, fmt: ChatFormat = ChatFormat()) -> list[dict]:
    if example.messages is not None:
        messages = [dict(m) for m in example.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = _wrap(messages[last_user]["content"], fmt)
        if fmt.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        return messages
    if example.prompt is None:
        raise DatasetError(f"example {example.id!r} has neither a prompt nor messages")
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    messages.append({"role": "user", "content": _wrap(example.prompt, fmt)})
    return messages


class PromptRenderer:
    def __init__(self, tokenizer, fmt: ChatFormat = ChatFormat()):
        self.tokenizer, self.fmt = tokenizer, fmt
        if fmt.use_chat_template and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ChatTemplateError(f"tokenizer {name!r} has no chat template; use an -Instruct checkpoint, or set "
                                    f"use_chat_template=false to feed the plain question text")
        self.num_too_long = 0
        self.too_long_samples: list[str] = []

    def text(self, example: PromptExample) -> str:
        messages = build_messages(example, self.fmt)
        if self.fmt.use_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def render(self, example: PromptExample) -> Optional[RenderedPrompt]:
        """The rendered prompt, or None when it is too long and ``on_too_long="skip"``."""
        text = self.text(example)
        ids = list(self.tokenizer(text, add_special_tokens=not self.fmt.use_chat_template)["input_ids"])
        limit = self.fmt.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            msg = f"prompt {example.id!r} has {len(ids)} tokens, more than max_prompt_tokens={limit}"
            if self.fmt.on_too_long == "error":
                raise PromptTooLongError(f"{msg}. Raise the limit (and the context length), shorten the system "
                                         f"prompt / instruction, or set on_too_long=skip to drop such prompts.")
            self.num_too_long += 1
            if len(self.too_long_samples) < 5:
                self.too_long_samples.append(msg)
            return None
        return RenderedPrompt(example, text, ids)

    def render_all(self, examples: Iterable[PromptExample]) -> list[RenderedPrompt]:
        """Render every example (do it at start-up); too-long ones raise or are skipped, counted and logged."""
        before = self.num_too_long
        out, total = [], 0
        for ex in examples:
            total += 1
            r = self.render(ex)
            if r is not None:
                out.append(r)
        skipped = self.num_too_long - before
        if skipped:
            logger.warning("skipped %d of %d prompts longer than max_prompt_tokens=%s; first: %s", skipped, total,
                           self.fmt.max_prompt_tokens, "; ".join(self.too_long_samples))
        if total and not out:
            raise PromptTooLongError(f"all {total} prompts are longer than max_prompt_tokens="
                                     f"{self.fmt.max_prompt_tokens}; raise it or shorten the prompts")
        return out
