"""The rollout-engine interface: what the trainer asks of any sampler (vLLM, transformers).

    [SampleRequest(key, group, prompt ids, seed)] --(RolloutEngine.run_requests: SamplingConfig, one batch)-->
      [Completion] in request order: every request is one sample with its own seed
    prompt token ids [P][*], samples per prompt n (int or [P])
      --(RolloutEngine.generate: requests (i, s) seeded engine_prompt_seed(seed, i) + s)--> [P][n_i] Completion
    requests added at any time --(RolloutEngine.stream(sampling) -> RolloutStream: add / step / stop)-->
      completions as they finish (vLLM: one continuous batch; the default: each step() runs what was added as
      one run_requests batch, i.e. round barriers)
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
from typing import Hashable, Iterable, Optional, Sequence, Union

import torch

from ..config import SamplingConfig
from ..errors import ConfigError
from ..seeds import engine_prompt_seed


class RolloutEngineError(RuntimeError):
    """The engine could not do what was asked; the message names the setting to change."""


def eos_token_ids(model_path: str, tokenizer=None) -> frozenset:
    """The token ids that end a completion, as vLLM takes them (vllm 0.32.0 sampling_params.py
    update_from_generation_config): the tokenizer's eos_token_id (none without a tokenizer) plus
    generation_config.json's eos_token_id (an int or a list). The transformers engine stops on the same set."""
    from transformers import GenerationConfig

    eos = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    try:
        generation = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        generation = None
    if generation is not None:
        eos.update([generation] if isinstance(generation, int) else map(int, generation))
    return frozenset(eos)


@dataclass
class Completion:
    prompt_index: int                     # index into the prompt list given to generate()
    token_ids: list[int]                  # generated tokens only (the prompt is not repeated)
    text: str                             # detokenized generated tokens ("" when the engine has no tokenizer)
    logprobs: torch.Tensor                # float32 [len(token_ids)]: the engine's log-prob of each sampled token
    finish_reason: str                    # "stop" (EOS / stop string / stop token) | "length" | "abort"
    sample_index: int = 0                 # which of the n samples of this prompt


@dataclass(frozen=True)
class SampleRequest:
    key: Hashable                         # the caller's name for this sample, e.g. (prompt id, sample index)
    group: Hashable                       # samples of one group stay on one engine replica (shared prompt cache)
    prompt_token_ids: tuple[int, ...]
    seed: Optional[int]                   # None: the engine's own RNG stream


@dataclass
class StreamStep:
    finished: list[tuple[Hashable, Completion]]     # (request key, completion) finished during this step
    running: dict                                   # request key -> tokens generated so far (unfinished requests);
                                                    # filled only by streams opened with track_running=True


class RolloutStream(abc.ABC):
    """Requests added at any time, completions returned as they finish. Every rank calls every method with the
    same arguments and gets the same results (an implementation over several replicas gathers them)."""

    @abc.abstractmethod
    def add(self, requests: Sequence[SampleRequest]) -> None:
        """Start these samples (keys unique within the stream)."""

    @abc.abstractmethod
    def step(self) -> StreamStep:
        """Advance the engine; the requests that finished meanwhile (every rank gets the same list)."""

    @abc.abstractmethod
    def stop(self, keys: Sequence[Hashable]) -> dict:
        """Abort these unfinished requests -> {key: Completion of the tokens generated so far, finish "abort",
        log-probs 0 (they are never trained)}."""

    @property
    @abc.abstractmethod
    def outstanding(self) -> int:
        """Requests added and neither finished nor stopped."""

    def close(self) -> None:
        """Drop whatever is still outstanding (after an error: the engine must be usable again)."""


class BatchStream(RolloutStream):
    """The stream of an engine without continuous batching: step() runs every request added since the last step
    as one run_requests batch and returns all of it (so a schedule on top proceeds in rounds). Nothing is ever
    running between steps, so nothing can be stopped."""

    def __init__(self, engine: "RolloutEngine", sampling: SamplingConfig):
        self.engine, self.sampling, self.pending = engine, sampling, []

    def add(self, requests):
        self.pending.extend(requests)

    def step(self) -> StreamStep:
        batch, self.pending = self.pending, []
        return StreamStep(list(zip([r.key for r in batch], self.engine.run_requests(batch, self.sampling))), {})

    def stop(self, keys):
        if keys:
            raise ValueError(f"{len(keys)} requests to stop, but this engine runs rounds (BatchStream): nothing "
                             "runs between steps. Early stop needs rollout.backend=vllm with rollout.schedule=stream; "
                             "otherwise set algorithm.early_stop=off")
        return {}

    def close(self) -> None:
        self.pending = []

    @property
    def outstanding(self) -> int:
        return len(self.pending)


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
    def run_requests(self, requests: Sequence[SampleRequest], sampling: SamplingConfig) -> list[Completion]:
        """One batch of single samples, each with its own seed (sampling.seed and sampling.n are not used);
        Completion.prompt_index is the request's position. The same random stream per seed whatever else is in the
        batch (the tokens too where the forward pass is batch-invariant, as vLLM's on CPU)."""

    def generate(self, prompt_token_ids: list[list[int]], n: Union[int, Sequence[int], None] = None,
                 sampling: Optional[SamplingConfig] = None) -> list[list[Completion]]:
        """n[i] samples of prompt i (n may differ per prompt; 0 gives an empty list). Sample s of prompt i is
        seeded engine_prompt_seed(sampling.seed, i) + s: what vLLM gives the children of an n > 1 request
        (vllm 0.32.0 v1/engine/parallel_sampling.py), so one code path serves generate and the schedule."""
        sampling = (sampling or SamplingConfig()).validate()
        counts = normalize_n(n, len(prompt_token_ids), sampling.n)
        requests = [SampleRequest((i, s), i, tuple(map(int, prompt_token_ids[i])),
                                  None if sampling.seed is None else engine_prompt_seed(sampling.seed, i) + s)
                    for i, c in enumerate(counts) for s in range(c)]
        out: list[list[Completion]] = [[] for _ in prompt_token_ids]
        for request, completion in zip(requests, self.run_requests(requests, sampling)):
            i, s = request.key
            completion.prompt_index, completion.sample_index = i, s
            out[i].append(completion)
        return out

    # ------------------------------------------------------------------ phase state, the same for every engine
    # _closed: close() ran. _sleeping / _asleep_tags: sleep() ran and these tags have not woken up yet.
    # _weights_valid: the engine holds a complete set of learner weights (False after rollout.load_format=dummy,
    # a level-2 sleep, or an update_weights() that did not complete): it refuses to sample until the next sync.
    def _init_phase_state(self, weights_loaded: bool) -> None:
        self._closed, self._sleeping, self._asleep_tags, self._weights_valid = False, False, set(), weights_loaded

    def sleep(self, level: Optional[int] = None) -> None:
        """Release accelerator memory for the learner phase: level 1 keeps a host copy of the weights, 2 discards
        them (a sync must follow before sampling); None: rollout.sleep_level. A sleeping engine refuses to sample
        or to take weights until wake_up(). The engine's own part is _release_memory."""
        level = self.cfg.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level {level}: must be 1 or 2")
        if self._sleeping:
            return
        self._release_memory(level)
        self._sleeping, self._asleep_tags = True, {"weights", "kv_cache"}
        if level == 2:
            self._weights_valid = False

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate memory; tags=["weights"] first, sync, then ["kv_cache"] keeps the peak low (None: both).
        Tags already awake are ignored. The engine's own part is _restore_memory."""
        if not self._sleeping:
            return
        tags = sorted(self._asleep_tags if tags is None else set(tags) & self._asleep_tags)
        if not tags:
            return
        self._restore_memory(tags)
        self._asleep_tags -= set(tags)
        self._sleeping = bool(self._asleep_tags)

    def _release_memory(self, level: int) -> None:
        """sleep(level)'s work on the engine's memory (nothing by default)."""

    def _restore_memory(self, tags: list[str]) -> None:
        """wake_up(tags)'s work on the engine's memory: the tags are asleep (nothing by default)."""

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def _begin_weight_update(self) -> None:
        """update_weights' entry: refuse a closed engine or non-resident weights; then the engine refuses to sample
        until the update completes (the engine sets _weights_valid = True at its end)."""
        if self._closed:
            raise RolloutEngineError("the rollout engine was closed")
        if "weights" in self._asleep_tags:     # enforced on CPU too, so CPU runs catch what would fail on GPU
            raise RolloutEngineError("wake_up(['weights']) before update_weights(): the weights are not resident")
        self._weights_valid = False

    # Checks every engine runs before sampling (they read cfg.max_model_len and the phase state).
    def _check_usable(self):
        if self._closed:
            raise RolloutEngineError("the rollout engine was closed")
        if self._sleeping:
            raise RolloutEngineError("the rollout engine is asleep: call wake_up() before generate()/score()")
        if not self._weights_valid:
            raise RolloutEngineError("the engine holds no complete learner weights (started with "
                                     "rollout.load_format=dummy, discarded by sleep(level=2), or the last "
                                     "update_weights() failed): call update_weights() (weight_sync.sync_weights)")

    def _check_lengths(self, lengths: list[int], extra: int, what: str):
        limit = self.cfg.max_model_len
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"{what} {i} is empty")
            if n + extra > limit:
                need = n + extra
                raise RolloutEngineError(
                    f"{what} {i} has {n} tokens; with {extra} more it needs {need} > rollout.max_model_len="
                    f"{limit}: raise rollout.max_model_len to at least {need}"
                    + (", lower sampling.max_tokens" if what == "prompt" else "")
                    + f" or drop {what}s longer than {limit - extra} tokens")

    def _check_requests(self, requests: Sequence[SampleRequest], sampling: SamplingConfig, has_tokenizer: bool):
        self._check_usable()
        if sampling.stop_strings and not has_tokenizer:
            raise ConfigError("sampling.stop has strings but the engine was started without a tokenizer: "
                              "give stop token ids instead")
        self._check_lengths([len(r.prompt_token_ids) for r in requests], sampling.max_tokens, "prompt")

    def stream(self, sampling: SamplingConfig, track_running: bool = False) -> RolloutStream:
        """A stream of requests (see RolloutStream). The default runs them in rounds (BatchStream); engines with
        continuous batching override it. track_running: report running requests' lengths (for early stop)."""
        return BatchStream(self, sampling.validate())

    @abc.abstractmethod
    def score(self, sequences: Iterable[Sequence[int]]) -> list[torch.Tensor]:
        """The engine's log p(token[i+1] | token[:i+1]) for every given sequence (float32, length L-1)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        """Load HF-named full tensors into the running engine (all of them, one pass, no disk)."""

    def close(self) -> None:
        """Shut the engine down and free its memory."""
