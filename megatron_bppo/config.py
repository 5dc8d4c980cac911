"""Typed run configuration: YAML file -> dataclasses -> dotted command-line overrides -> validation.

    cfg = load_config("examples/configs/tiny_bppo.yaml", ["parallel.tp=2", "optim.lr=1e-5"])

Every section of the run lives here, the rollout engine's and sampling's included, and this module imports nothing
of the package but errors.py (the choice lists of algorithm fields are imported inside validate, from the pure
algorithms package). Every section is a dataclass; unknown keys, wrong types and bad values raise `ConfigError`
with the dotted key and what to do about it, before any process group or model is created.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""                       # HF checkpoint directory (config.json + *.safetensors + tokenizer)
    dtype: str = "float32"               # float32 | bfloat16 | float16 (params and compute)
    trust_remote_code: bool = False      # never run code shipped with a checkpoint unless asked
    spec: str = "auto"                   # auto | local | te   (auto: TransformerEngine spec when TE is importable)

    def validate(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.spec", self.spec, ("auto", "local", "te"))


@dataclass
class ParallelConfig:
    tp: int = 1                          # tensor-model-parallel size
    pp: int = 1                          # pipeline-model-parallel size
    dp: Optional[int] = None             # data-parallel size; None = world_size / (tp * pp)
    backend: str = "auto"                # auto | nccl | gloo
    timeout_s: Optional[int] = None      # process-group timeout (s); None: 600 on CPU (gloo), 1800 on GPU (NCCL)

    def validate(self):
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)}: must be >= 1")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp={self.dp}: must be >= 1 (or null to derive it from the world size)")
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s={self.timeout_s}: must be > 0 (seconds a collective may wait)")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: Optional[int] = None    # None: constant LR after warm-up
    decay_style: str = "constant"        # constant | linear | cosine
    use_distributed_optimizer: bool = True

    def lr_schedule(self) -> dict:
        """megatron-core OptimizerParamScheduler's arguments (learner.Learner builds it from them; a resume must
        find the same in the checkpoint: checkpointing.check_resume_schedule)."""
        decay_steps = self.decay_steps or max(self.warmup_steps, 1)
        return {"init_lr": 0.0 if self.warmup_steps else self.lr, "max_lr": self.lr, "min_lr": self.min_lr,
                "lr_warmup_steps": self.warmup_steps, "lr_decay_steps": max(decay_steps, self.warmup_steps + 1),
                "lr_decay_style": self.decay_style, "start_wd": self.weight_decay, "end_wd": self.weight_decay,
                "wd_incr_steps": 1, "wd_incr_style": "constant"}

    def validate(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr}: must be in [0, optim.lr={self.lr}]")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be >= 0 (0 disables it)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)}: must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"optim.adam_eps={self.adam_eps}: must be > 0 (it keeps Adam's update finite where "
                              "the second moment is 0), e.g. 1e-8")
        if not self.clip_grad >= 0:
            raise ConfigError(f"optim.clip_grad={self.clip_grad}: must be >= 0 (0 disables clipping)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0 (0: no warm-up)")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"optim.decay_steps={self.decay_steps}: must be >= 1 (or null for a constant LR "
                              "after warm-up)")
        _choice("optim.decay_style", self.decay_style, ("constant", "linear", "cosine"))
        if self.decay_style != "constant" and not self.decay_steps:
            raise ConfigError(f"optim.decay_style={self.decay_style} needs optim.decay_steps > 0")
        if self.decay_style != "constant" and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"optim.decay_steps={self.decay_steps}: must be > optim.warmup_steps="
                              f"{self.warmup_steps} with optim.decay_style={self.decay_style} (decay_steps counts "
                              "optimizer steps from the start, warm-up included): raise decay_steps")


@dataclass
class LearnerConfig:
    micro_batch_tokens: int = 4096       # token budget of one packed micro-batch
    max_seq_len: int = 1024              # longest sequence (prompt + response) the learner accepts
    seed: int = 1234
    recompute: bool = False              # full activation recomputation
    # real tokens per chunk of the output layer + log-softmax (learner.chunked_token_logprobs): a micro-batch's
    # full logits are never held; peak logits memory ~ chunk x vocab/tp x 4 B per copy. 0: the model's own output
    # layer over the whole micro-batch (the path before issue 27)
    logprob_chunk_tokens: int = 1024

    def validate(self):
        if self.max_seq_len < 2:
            raise ConfigError(f"learner.max_seq_len={self.max_seq_len}: must be >= 2 (a training sequence is at "
                              "least a prompt token and a target)")
        if self.logprob_chunk_tokens < 0:
            raise ConfigError(f"learner.logprob_chunk_tokens={self.logprob_chunk_tokens}: must be >= 0 (0: whole "
                              "micro-batch logits, the path before chunking; 1024 is the default)")
        if self.micro_batch_tokens < 1:
            raise ConfigError(f"learner.micro_batch_tokens={self.micro_batch_tokens}: must be >= 1")
        if self.micro_batch_tokens < self.max_seq_len:
            raise ConfigError(
                f"learner.micro_batch_tokens={self.micro_batch_tokens} < learner.max_seq_len={self.max_seq_len}: "
                "a micro-batch must hold at least one full sequence; raise micro_batch_tokens")


@dataclass
class CheckpointConfig:
    dir: str = ""                        # Megatron dist-checkpoint root; "" disables saving
    save_interval: int = 0               # steps between saves; 0 = only at the end
    keep_last: int = 2                   # complete checkpoints kept (0: all); incomplete ones are never removed
    resume: bool = True                  # resume from the latest complete checkpoint under dir
    allow_fresh_start: bool = False      # start at step 0 although dir holds only incomplete checkpoints
    allow_data_change: bool = False      # resume although the rendered train prompts (same count) or data.seed
                                         # changed: the saved position and order continue
    break_lock: bool = False             # take dir's lock although its owner may be alive (one-off, on the
                                         # command line: two live runs in one dir overwrite each other)
    optimizer_format: str = "dp_reshardable"   # dp_reshardable: parallel save, resumes at the same TP x PP (any
                                         # DP); fully_reshardable: resumes at any layout, but gathers each shard's
                                         # whole optimizer state on one rank per save (docs/operations.md)

    def validate(self):
        if self.save_interval < 0:
            raise ConfigError(f"checkpoint.save_interval={self.save_interval}: must be >= 0 (0: only at the end)")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last}: must be >= 0 (0: keep every checkpoint)")
        _choice("checkpoint.optimizer_format", self.optimizer_format, ("dp_reshardable", "fully_reshardable"))


@dataclass
class AlgorithmConfig:
    """GRPO and BPPO through the same code; see docs/algorithm.md for every formula and default."""
    name: str = "bppo"                   # grpo | bppo: picks the defaults of selector / prefix / adaptive
    advantage: str = "grpo"              # grpo (mean/std over the full group) | drgrpo (no std division)
    adv_eps: float = 1e-6
    selector: str = "auto"               # auto (grpo: all, bppo: binary) | all | binary | random_pair |
                                         # max_variance_pairs (correct = the reward function's `correct` flag)
    pair_weighting: str = "none"         # none | class_total | contrast (docs/algorithm.md section 3)
    normalizer: str = "trained"          # loss denominator: trained (tokens / sequences trained) | rollout (GRPO's)
    prefix: str = "auto"                 # auto (grpo: full, bppo: ratio) | ratio | fixed | full | pair | to_correct
                                         # (pair, to_correct: cut to a length of the selected pair; section 5)
    prefix_ratio: float = 0.5
    prefix_tokens: Optional[int] = None
    prefix_min_tokens: int = 32
    prefix_max_tokens: Optional[int] = None
    prefix_schedule: list = field(default_factory=list)   # [[step, value], ...] for ratio / tokens
    group_size: int = 8                  # G of GRPO; the most completions per prompt (g_max) with adaptive
    adaptive: Optional[bool] = None      # adaptive completion scheduling; None: on for bppo, off for grpo
    n_init: int = 4                      # adaptive: first-round completions per prompt
    n_step: int = 4                      # adaptive: completions added per extra round to single-class groups
    skip_after: int = 2                  # adaptive: skip prompts uniform this many recorded times in a row
    skip_cooldown: int = 4               # adaptive: a skipped prompt is offered again after this many skips
    retry_prob: float = 0.0              # adaptive: ... or earlier, with this probability per skipped offer
    target_pairs: Optional[int] = None   # adaptive: draw more prompts until this many groups are mixed
    max_prompt_draw_factor: float = 2.0
    min_mixed_rate: float = 0.1          # adaptive: floor of the mixed-group rate that sizes a draw of more prompts
    early_stop: str = "off"              # off | as_incorrect | exclude: stop running completions binary selection
                                         # can no longer pick (docs/algorithm.md section 11; streaming rollouts).
                                         # Not for training yet: its runs lost accuracy (docs/benchmarks.md 6.12)
    clip_low: float = 0.2
    clip_high: float = 0.28              # DAPO's clip-higher
    aggregation: str = "token-mean"      # token-mean | seq-mean-token-mean | token-sum-norm
    norm_constant: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    rollout_is: str = "none"             # none | truncated (importance ratio against the engine's log-probs)
    rollout_is_cap: float = 2.0
    epochs: int = 1                      # passes over each rollout batch
    mini_batches: int = 1                # optimizer steps per pass

    def resolved_selector(self) -> str:
        return self.selector if self.selector != "auto" else ("binary" if self.name == "bppo" else "all")

    def resolved_prefix(self) -> str:
        return self.prefix if self.prefix != "auto" else ("ratio" if self.name == "bppo" else "full")

    def is_adaptive(self) -> bool:
        return self.adaptive if self.adaptive is not None else self.name == "bppo"

    def validate(self):
        from .algorithms import (AGGREGATIONS, EARLY_STOP_POLICIES, KL_ESTIMATORS, PAIR_WEIGHTINGS, PREFIX_MODES,
                                 SELECTORS)

        _choice("algorithm.name", self.name, ("grpo", "bppo"))
        _choice("algorithm.advantage", self.advantage, ("grpo", "drgrpo"))
        _choice("algorithm.selector", self.selector, ("auto", *SELECTORS))
        _choice("algorithm.pair_weighting", self.pair_weighting, PAIR_WEIGHTINGS)
        _choice("algorithm.early_stop", self.early_stop, EARLY_STOP_POLICIES)
        if self.early_stop != "off" and self.resolved_selector() != "binary":
            raise ConfigError(f"algorithm.early_stop={self.early_stop} stops completions that the binary selector "
                              f"(shortest correct + shortest incorrect) can no longer pick, but the selector is "
                              f"{self.resolved_selector()!r}, which may pick any completion: set "
                              "algorithm.early_stop=off")
        _choice("algorithm.normalizer", self.normalizer, ("trained", "rollout"))
        _choice("algorithm.prefix", self.prefix, ("auto", *PREFIX_MODES))
        _choice("algorithm.aggregation", self.aggregation, AGGREGATIONS)
        _choice("algorithm.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("algorithm.rollout_is", self.rollout_is, ("none", "truncated"))
        if self.group_size < 2:
            raise ConfigError(f"algorithm.group_size={self.group_size}: a group needs >= 2 completions")
        if self.is_adaptive() and not 1 <= self.n_init <= self.group_size:
            raise ConfigError(f"algorithm.n_init={self.n_init}: must be in [1, group_size={self.group_size}]")
        for key in ("epochs", "mini_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algorithm.{key}={getattr(self, key)}: must be >= 1")
        if not self.adv_eps >= 0:
            raise ConfigError(f"algorithm.adv_eps={self.adv_eps}: must be >= 0")
        if not 0 <= self.clip_low < 1:
            raise ConfigError(f"algorithm.clip_low={self.clip_low}: must be in [0, 1) (the ratio's floor is "
                              "1 - clip_low)")
        if not self.clip_high >= 0:
            raise ConfigError(f"algorithm.clip_high={self.clip_high}: must be >= 0 (the ratio's ceiling is "
                              "1 + clip_high)")
        if not self.kl_coef >= 0:
            raise ConfigError(f"algorithm.kl_coef={self.kl_coef}: must be >= 0 (0 disables the KL penalty)")
        if self.norm_constant is not None and not self.norm_constant > 0:
            raise ConfigError(f"algorithm.norm_constant={self.norm_constant}: must be > 0 (or null)")
        if self.aggregation == "token-sum-norm" and self.norm_constant is None:
            raise ConfigError("algorithm.aggregation=token-sum-norm needs algorithm.norm_constant > 0 (e.g. "
                              "sampling.max_tokens), got null")
        if not self.rollout_is_cap >= 1:
            raise ConfigError(f"algorithm.rollout_is_cap={self.rollout_is_cap}: must be >= 1 (a cap below 1 "
                              "would also shrink the weight of on-policy tokens, whose ratio is 1)")
        self._validate_schedule()
        self._validate_prefix()

    def _validate_schedule(self):
        """The adaptive-scheduling fields (collect.sampling_schedule -> algorithms.AdaptiveScheduler)."""
        from .algorithms import SCHEDULER_HISTORY_WINDOW as history   # collect.sampling_schedule keeps the default

        if self.n_step < 1:
            raise ConfigError(f"algorithm.n_step={self.n_step}: must be >= 1")
        if not 0 <= self.skip_after <= history:
            raise ConfigError(f"algorithm.skip_after={self.skip_after}: must be in [0, {history}] (0 disables "
                              f"skipping; the scheduler keeps each prompt's last {history} outcomes)")
        if self.skip_cooldown < 1:
            raise ConfigError(f"algorithm.skip_cooldown={self.skip_cooldown}: must be >= 1 (skipped offers before "
                              "a skipped prompt is tried again; to stop skipping set algorithm.skip_after=0)")
        if not 0 <= self.retry_prob <= 1:
            raise ConfigError(f"algorithm.retry_prob={self.retry_prob}: must be in [0, 1] (the chance that a "
                              "skipped prompt is tried again before algorithm.skip_cooldown skips)")
        if self.target_pairs is not None and self.target_pairs < 1:
            raise ConfigError(f"algorithm.target_pairs={self.target_pairs}: must be >= 1 (or null to draw no "
                              "extra prompts)")
        if not self.max_prompt_draw_factor >= 1:
            raise ConfigError(f"algorithm.max_prompt_draw_factor={self.max_prompt_draw_factor}: must be >= 1 "
                              "(the most prompts a step may draw, as a multiple of data.prompts_per_step)")
        if not 0 < self.min_mixed_rate <= 1:
            raise ConfigError(f"algorithm.min_mixed_rate={self.min_mixed_rate}: must be in (0, 1] (the lowest "
                              "mixed-group rate assumed when sizing a draw of more prompts)")

    def _validate_prefix(self):
        """The prefix fields, key by key (algorithms.PrefixRule checks the same invariants on its own inputs)."""
        from .algorithms import PAIR_PREFIX_MODES, PAIR_SELECTORS

        mode = self.resolved_prefix()
        if mode in PAIR_PREFIX_MODES and self.resolved_selector() not in PAIR_SELECTORS:
            raise ConfigError(f"algorithm.prefix={mode} cuts both members of the selected pair to a length taken "
                              f"from the pair, but algorithm.selector resolves to {self.resolved_selector()!r} "
                              f"(algorithm.name={self.name}), which does not select exactly one correct and one "
                              f"incorrect completion per mixed group: use a pair selector "
                              f"({' / '.join(PAIR_SELECTORS)}), or a per-response prefix (ratio / fixed / full)")
        if mode == "ratio" and not self.prefix_schedule and not 0 < self.prefix_ratio <= 1:
            raise ConfigError(f"algorithm.prefix_ratio={self.prefix_ratio}: must be in (0, 1]")
        if mode == "fixed" and not self.prefix_schedule and (self.prefix_tokens is None or self.prefix_tokens < 1):
            raise ConfigError(f"algorithm.prefix=fixed needs algorithm.prefix_tokens >= 1 (or a prefix_schedule), "
                              f"got {self.prefix_tokens}")
        if self.prefix_min_tokens < 1:
            raise ConfigError(f"algorithm.prefix_min_tokens={self.prefix_min_tokens}: must be >= 1")
        if self.prefix_max_tokens is not None and self.prefix_max_tokens < self.prefix_min_tokens:
            raise ConfigError(f"algorithm.prefix_max_tokens={self.prefix_max_tokens}: must be >= "
                              f"algorithm.prefix_min_tokens={self.prefix_min_tokens} (or null for no ceiling)")
        if not self.prefix_schedule:
            return
        if mode in ("full", *PAIR_PREFIX_MODES):
            raise ConfigError(f"algorithm.prefix_schedule is meaningless with algorithm.prefix={mode}: remove it or "
                              "use ratio / fixed")
        points = [tuple(p) if isinstance(p, (list, tuple)) else (p,) for p in self.prefix_schedule]
        if any(len(p) != 2 for p in points):
            raise ConfigError(f"algorithm.prefix_schedule={self.prefix_schedule}: expected [[step, value], ...]")
        steps = [s for s, _ in points]
        if any(not isinstance(s, (int, float)) or int(s) != s or s < 0 for s in steps) or steps != sorted(steps):
            raise ConfigError(f"algorithm.prefix_schedule steps {steps}: must be non-decreasing integers >= 0")
        for s, v in points:
            ok = isinstance(v, (int, float)) and (0 < v <= 1 if mode == "ratio" else v >= 1)
            if not ok:
                raise ConfigError(f"algorithm.prefix_schedule value {v!r} at step {s}: must be "
                                  + ("a ratio in (0, 1]" if mode == "ratio" else "a token count >= 1"))


# ----------------------------------------------------------------------- rollout engine and sampling
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
ROLLOUT_BACKENDS = ("vllm", "hf")      # rollout/vllm_engine.py VLLMEngine | rollout/hf_engine.py HFEngine


@dataclass
class RolloutConfig:
    backend: str = "vllm"                     # vllm | hf (transformers: slow, exact, no vLLM needed; tp must be 1)
    tp: int = 1                               # vLLM tensor-parallel size per engine replica (divides world size)
    max_model_len: int = 2048                 # longest prompt + completion (tokens) the engine accepts
    max_num_seqs: int = 64                    # most sequences decoded at once per replica
    kv_cache_memory_bytes: Optional[int] = None   # KV cache per rank; CPU default 1 GiB; GPU: None uses ...
    gpu_memory_utilization: float = 0.5       # ... this fraction of the GPU (shared with the learner)
    enable_sleep_mode: bool = True            # GPU: free weights + KV cache while the learner trains
    sleep_level: int = 2                      # 2: drop weights on sleep (re-synced anyway); 1: keep a host copy
    enforce_eager: Optional[bool] = None      # None: eager on CPU, CUDA graphs on GPU
    seed: int = 0                             # engine RNG seed (replica r uses seed + r)
    load_format: str = "auto"                 # "dummy": random init, real weights arrive with the first sync
    logprobs_mode: str = "processed_logprobs" # log-probs after temperature/top-p: the sampling distribution
    bucket_bytes: int = 256 << 20             # weight sync: most bytes of exported tensors in flight per rank
    logprob_mismatch_warn: float = 0.02       # warn when mean |engine - learner| log-prob exceeds this
    engine_kwargs: dict = field(default_factory=dict)   # passed to vllm.LLM as is (expert settings)
    schedule: str = "stream"                  # stream: one continuous batch per step, completions join as groups
                                              # need them; rounds: one generate call per scheduling round
    stream_sync_steps: int = 4                # several replicas: engine steps between the gathers of finished
                                              # samples (1: every step; more: fewer collectives, later decisions)

    def validate(self) -> "RolloutConfig":
        for key in ("tp", "max_model_len", "max_num_seqs", "bucket_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key}={getattr(self, key)}: must be >= 1")
        if self.backend not in ROLLOUT_BACKENDS:
            raise ConfigError(f"rollout.backend={self.backend!r}: must be one of {', '.join(ROLLOUT_BACKENDS)} "
                              "(vllm: the vLLM engine; hf: the transformers engine, for debugging and machines "
                              "without vLLM)")
        if self.backend == "hf" and self.tp != 1:
            raise ConfigError(f"rollout.tp={self.tp} with rollout.backend=hf: the transformers engine holds a full "
                              "model copy on every rank (no tensor parallelism); set rollout.tp=1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"rollout.kv_cache_memory_bytes={self.kv_cache_memory_bytes}: must be > 0 or null")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"rollout.sleep_level={self.sleep_level}: must be 1 or 2")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"rollout.load_format={self.load_format!r}: must be one of {', '.join(LOAD_FORMATS)}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ConfigError(f"rollout.logprobs_mode={self.logprobs_mode!r}: must be one of "
                              f"{', '.join(LOGPROBS_MODES)}")
        _choice("rollout.schedule", self.schedule, ("stream", "rounds"))
        if self.stream_sync_steps < 1:
            raise ConfigError(f"rollout.stream_sync_steps={self.stream_sync_steps}: must be >= 1")
        if self.logprob_mismatch_warn < 0:
            raise ConfigError(f"rollout.logprob_mismatch_warn={self.logprob_mismatch_warn}: must be >= 0")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"rollout.seed={self.seed}: must be in [0, 2**32 - 1] (vLLM seeds NumPy with "
                              "rollout.seed + the replica index)")
        return self


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
class DataConfig:
    train: str = "arithmetic:l0"         # a jsonl / parquet file, or arithmetic:<preset> (generated task)
    eval: str = ""                       # held-out prompts; "" = the test split of a generated train task
    train_size: Optional[int] = None     # generated: problems (default 1024); files: row limit
    eval_size: int = 64
    prompts_per_step: int = 16
    seed: int = 0
    system_prompt: Optional[str] = None  # None keeps the chat template's default
    instruction: str = "direct"          # direct | cot | gsm8k | boxed | none | any literal text
    instruction_position: str = "prefix" # prefix | suffix (relative to the question)
    on_too_long: str = "error"           # error | skip (prompts over the budget: data/prompts.py prompt_budget)

    def validate(self):
        if self.prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step={self.prompts_per_step}: must be >= 1")
        _choice("data.instruction_position", self.instruction_position, ("prefix", "suffix"))
        _choice("data.on_too_long", self.on_too_long, ("error", "skip"))
        if not self.train:
            raise ConfigError("data.train is empty: give a jsonl / parquet file or arithmetic:<preset>")
        if self.train_size is not None and self.train_size < 1:
            raise ConfigError(f"data.train_size={self.train_size}: must be >= 1 (or null: a generated task's "
                              "default size, a file's every row)")
        if self.eval_size < 1:
            raise ConfigError(f"data.eval_size={self.eval_size}: must be >= 1")
        if self.train_size is not None and self.prompts_per_step > self.train_size:
            raise ConfigError(f"data.prompts_per_step={self.prompts_per_step} > data.train_size={self.train_size}: "
                              "a step draws distinct prompts; lower prompts_per_step or raise train_size")


@dataclass
class RewardConfig:
    name: str = "gsm8k"                  # a registered reward (math, gsm8k, ...) or "package.module:function"
    kwargs: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    interval: int = 0                    # steps between evaluations (0: only before and after training)
    samples: int = 4                     # k of mean@k (sampled at sampling.temperature); pass@1 is greedy
    at_start: bool = True

    def validate(self):
        if self.interval < 0:
            raise ConfigError(f"eval.interval={self.interval}: must be >= 0 (0: only before and after training)")
        if self.samples < 0:
            raise ConfigError(f"eval.samples={self.samples}: must be >= 0 (0: no sampled mean@k, greedy pass@1 only)")


@dataclass
class TrainConfig:
    steps: int = 10
    export_hf: bool = True               # write <run_dir>/hf at the end
    tensorboard: bool = True
    wandb_project: str = ""              # "" disables Weights & Biases
    dump_batches: bool = False           # write each step's groups and learner sequences to run_dir/batches

    def validate(self):
        if self.steps < 0:
            raise ConfigError(f"train.steps={self.steps}: must be >= 0 (0 only evaluates the starting model)")


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as e:          # sections defined next to their module raise ValueError
                    raise ConfigError(f"{f.name}: {e}") from None
        if self.sampling.max_tokens >= self.rollout.max_model_len:
            raise ConfigError(f"sampling.max_tokens={self.sampling.max_tokens} leaves no room for the prompt in "
                              f"rollout.max_model_len={self.rollout.max_model_len}: raise max_model_len")
        self._validate_draw_budget()
        if self.algorithm.early_stop != "off" and (self.rollout.schedule, self.rollout.backend) != ("stream", "vllm"):
            raise ConfigError(f"algorithm.early_stop={self.algorithm.early_stop} stops running completions, but "
                              f"rollout.schedule={self.rollout.schedule} with rollout.backend={self.rollout.backend} "
                              "runs rounds (nothing runs between them): set rollout.schedule=stream and "
                              "rollout.backend=vllm, or algorithm.early_stop=off")
        if self.sampling.temperature == 0:
            raise ConfigError("sampling.temperature=0 is greedy: every completion of a group would be the same; "
                              "training needs a sampling temperature > 0 (evaluation is greedy on its own)")
        if self.model.path and not os.path.isdir(self.model.path):
            raise ConfigError(f"model.path={self.model.path!r} is not a directory: point it at a Hugging Face "
                              "checkpoint directory (config.json + *.safetensors)")
        return self

    def _validate_draw_budget(self):
        """Drawing more prompts (algorithm.target_pairs) takes distinct prompts: at most
        floor(max_prompt_draw_factor * prompts_per_step) per step, which the training set must hold."""
        import math

        algo, data = self.algorithm, self.data
        if not (algo.is_adaptive() and algo.target_pairs is not None and data.train_size is not None):
            return
        most = math.floor(algo.max_prompt_draw_factor * data.prompts_per_step)
        if most > data.train_size:
            raise ConfigError(
                f"data.train_size={data.train_size} < {most}, the most distinct prompts a step may draw with "
                f"algorithm.target_pairs={algo.target_pairs} (algorithm.max_prompt_draw_factor="
                f"{algo.max_prompt_draw_factor} x data.prompts_per_step={data.prompts_per_step}): raise "
                "data.train_size or lower max_prompt_draw_factor / prompts_per_step")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(key: str, value: Any, allowed: tuple):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(sorted(known))}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(key, v, item) for v in value]
    if tp is Any:
        return value
    if isinstance(value, dict) and not dataclasses.is_dataclass(tp) and tp is not dict \
            and typing.get_origin(tp) is not dict:
        raise ConfigError(f"{key} is a value, not a section: write {key}=<value>")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number, got a boolean")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected {tp.__name__}") from None
        if tp is int:
            if number != int(number):
                raise ConfigError(f"{key}={value!r}: expected an integer")
            return int(number)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return dict(value)
    return value


def _build(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown(dotted, names)
        kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': '1'}, 'c': 'x'} (values stay strings; typed later)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. parallel.tp=2")
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, cls=Config):
    """YAML at `path` (optional) + dotted overrides -> validated `cls` instance."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r}: top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(cls, data).validate()
