"""The rollout-engine interface: what the trainer asks of any sampler (vLLM here, another backend later).

    prompt token ids [P][*], samples per prompt n (int or [P])
      --(RolloutEngine.generate: SamplingConfig)--> [P][n_i] Completion(token ids, text, per-token log-probs, finish)
    sequences [S][*] --(RolloutEngine.score)--> [S] per-token log-probs (len L-1, like Learner.compute_logprobs)
    (hf_name, full tensor)* --(RolloutEngine.update_weights)--> engine holds the learner's weights
    sleep() / wake_up(): hand accelerator memory to the learner and back between phases

Every rank of a torchrun/Slurm job calls these methods with the same arguments; an implementation that runs
several engine replicas splits the work over them and returns the complete result on every rank (the
learner expects identical sequences on every rank).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch

from ..config import SamplingConfig


class RolloutEngineError(RuntimeError):
    """The engine could not do what was asked; the message names the setting to change."""


@dataclass
class Completion:
    prompt_index: int                     # index into the prompt list given to generate()
    token_ids: list[int]                  # generated tokens only (the prompt is not repeated)
    text: str                             # detokenized generated tokens ("" when the engine has no tokenizer)
    logprobs: torch.Tensor                # float32 [len(token_ids)]: the engine's log-prob of each sampled token
    finish_reason: str                    # "stop" (EOS / stop string / stop token) | "length" | "abort"
    sample_index: int = 0                 # which of the n samples of this prompt


@dataclass
class WeightUpdateStats:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    buckets: int = 0
    max_bucket_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return dict(tensors=self.tensors, bytes=self.bytes, seconds=self.seconds, buckets=self.buckets,
                    max_bucket_bytes=self.max_bucket_bytes, bytes_per_s=self.bytes_per_s, **self.extra)


def normalize_n(n: Union[int, Sequence[int], None], num_prompts: int, default: int) -> list[int]:
    """n as an int, a per-prompt list, or None (use SamplingConfig.n) -> per-prompt list of counts >= 0."""
    if n is None:
        n = default
    if isinstance(n, int) and not isinstance(n, bool):
        counts = [n] * num_prompts
    else:
        counts = [int(c) for c in n]
        if len(counts) != num_prompts:
            raise ValueError(f"n has {len(counts)} entries for {num_prompts} prompts: give one count per prompt")
    if any(c < 0 for c in counts):
        raise ValueError(f"n must be >= 0 per prompt, got {counts}")
    return counts


class RolloutEngine(abc.ABC):
    """A sampler that can take new weights. See the module docstring for the data path."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], n: Union[int, Sequence[int], None] = None,
                 sampling: Optional[SamplingConfig] = None) -> list[list[Completion]]:
        """n[i] samples of prompt i (n may differ per prompt; 0 gives an empty list)."""

    @abc.abstractmethod
    def score(self, sequences: Iterable[Sequence[int]]) -> list[torch.Tensor]:
        """The engine's log p(token[i+1] | token[:i+1]) for every given sequence (float32, length L-1)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        """Load HF-named full tensors into the running engine (all of them, one pass, no disk)."""

    def sleep(self, level: int = 2) -> None:
        """Release accelerator memory: 1 keeps a host copy of the weights, 2 discards them (resync before use)."""

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate memory; tags=["weights"] first, sync, then ["kv_cache"] keeps the peak low."""

    @property
    def is_sleeping(self) -> bool:
        return False

    def close(self) -> None:
        """Shut the engine down and free its memory."""
