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

from ..errors import ConfigError


class RolloutEngineError(RuntimeError):
    """The engine could not do what was asked; the message names the setting to change."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0              # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256                 # most tokens generated per completion
    stop: Sequence[Union[str, int]] = ()  # stop strings and/or stop token ids (EOS always stops unless ignore_eos)
    seed: Optional[int] = None            # None: the engine's own RNG stream; an int: reproducible per prompt/sample
    n: int = 1                            # default samples per prompt when generate() gets no n
    ignore_eos: bool = False              # keep generating past EOS (fixed-length benchmarks and tests)

    def validate(self) -> "SamplingConfig":
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError(f"sampling.max_tokens={self.max_tokens}: must be >= 1")
        if self.n < 0:
            raise ConfigError(f"sampling.n={self.n}: must be >= 0")
        for s in self.stop:
            if isinstance(s, bool) or not isinstance(s, (str, int)) or s == "":
                raise ConfigError(f"sampling.stop entry {s!r}: expected a non-empty string or a token id")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in self.stop if isinstance(s, str)]

    @property
    def stop_token_ids(self) -> list[int]:
        return [s for s in self.stop if isinstance(s, int) and not isinstance(s, bool)]


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
