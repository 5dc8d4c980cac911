"""The Megatron learner: per-token log-probs of given sequences and a train step with a pluggable loss.

    sequences (token lists, identical on every rank)
      --(plan_micro_batches: balance tokens over DP ranks, pack by length under a token budget)--> micro-batches
      --(get_forward_backward_func: TP/PP schedule over the model chunks)--> last stage's hidden states
      --(output layer + mask padded vocab columns + vocab_parallel_cross_entropy, over chunks of
         learner.logprob_chunk_tokens real tokens, each chunk's logits recomputed in the backward; no full-vocab
         gather)--> per-token log-probs
      --(loss_fn, DDP grad reduce, distributed optimizer, grad clip, LR schedule)--> updated weights

Micro-batches are padded, not packed: sequences are sorted by length and grouped so that
batch * longest <= learner.micro_batch_tokens, which keeps padding small. Packed (THD) batches need
TransformerEngine's fused attention, which megatron-core's local spec (the CPU path) does not support.

A micro-batch's full logits ([b, S, V/tp], 0.4 GB per fp32 copy for 2048 tokens of a 49 k vocabulary, several
copies alive in the backward) are never built unless learner.logprob_chunk_tokens=0 (the model's own output
layer, then token_logprobs: the path before issue 27, kept for comparison). megatron-core 0.16.1 has no path
without them: GPTModel._postprocess always runs the whole output layer (its fused-CE option is TE/CUDA-only and
returns a loss, not per-token log-probs).

Per-token tensors follow the targets: for a sequence of L tokens, index i holds log p(token[i+1] | token[:i+1]),
so every per-token field has length L - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from .config import LearnerConfig, OptimConfig
from .errors import ConfigError


@dataclass
class MicroBatch:
    indices: list[int]                  # global sequence indices
    tokens: torch.Tensor                # [b, S] right-padded
    lengths: torch.Tensor               # [b]
    fields: dict                        # name -> [b, S-1] right-padded per-token tensors
    weight: float = 1.0                 # 0 for the filler micro-batch of a DP rank with no sequences

    @property
    def target_mask(self) -> torch.Tensor:
        positions = torch.arange(self.tokens.shape[1] - 1, device=self.tokens.device)
        return positions.unsqueeze(0) < (self.lengths - 1).unsqueeze(1)


def split_over_dp(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Longest-first greedy assignment of sequence indices to DP ranks, balancing token counts."""
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(dp_size), key=lambda r: (load[r], r))
        shares[rank].append(index)
        load[rank] += lengths[index]
    return [sorted(s) for s in shares]


def pack_by_length(indices: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequences (longest first) so that len(group) * longest_in_group <= token_budget."""
    groups: list[list[int]] = []
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def collate(indices: list[int], sequences: list[torch.Tensor], fields: Optional[list[dict]], pad_id: int,
            device, weight: float = 1.0, multiple: int = 1) -> MicroBatch:
    """Right-pad to the longest sequence, rounded up to `multiple` (the TP size under sequence parallelism, which
    splits the sequence dimension over TP ranks: megatron-core requires seq_len % tp == 0). Padding sits after
    every real token, so causal attention keeps it out of every real position's log-prob."""
    lengths = torch.tensor([len(sequences[i]) for i in indices])
    width = -(-int(lengths.max()) // multiple) * multiple
    tokens = torch.full((len(indices), width), pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        tokens[row, : lengths[row]] = sequences[i]
    padded = {}
    for name in (fields[indices[0]] if fields else {}):
        values = torch.zeros(len(indices), width - 1, dtype=fields[indices[0]][name].dtype)
        for row, i in enumerate(indices):
            value = fields[i][name]
            if value.shape[0] != lengths[row] - 1:
                raise ValueError(f"field {name!r} of sequence {i} has {value.shape[0]} entries; expected "
                                 f"len(tokens) - 1 = {int(lengths[row]) - 1}")
            values[row, : value.shape[0]] = value
        padded[name] = values.to(device)
    return MicroBatch(list(indices), tokens.to(device), lengths.to(device), padded, weight)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Vocab-parallel logits [..., V_padded/tp] with the columns of padded vocabulary rows (global index >=
    vocab_size, see model.bridge.padded_vocab_size) set to -inf: they drop out of the softmax exactly, and
    masked_fill passes them a zero gradient, so the padded output-layer rows never change. Out of place; returns
    `logits` itself when this TP rank holds no padded column (or vocab_size is None)."""
    if vocab_size is None:
        return logits
    from megatron.core import parallel_state as ps

    width = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * width
    real = min(max(vocab_size - start, 0), width)
    if real == width:
        return logits
    padded = torch.arange(width, device=logits.device) >= real
    return logits.masked_fill(padded, float("-inf"))


def _real_vocab_size(model) -> Optional[int]:
    from megatron.core.utils import get_attr_wrapped_model

    try:
        return get_attr_wrapped_model(model, "hf_vocab_size")
    except RuntimeError:                    # not built by model.bridge (no padding recorded)
        return None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    vocab_size: Optional[int] = None) -> torch.Tensor:
    """[..., V/tp] vocab-parallel logits and [...] target ids -> [...] log p(target) at `temperature`; shards are
    never gathered. `vocab_size`: the real (HF) vocabulary when the model's is padded for TP: the log-softmax runs
    over the real columns only (mask_padded_vocab)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature                     # a fresh tensor: the CE kernel edits it in place
    scaled = mask_padded_vocab(scaled, vocab_size)
    return -vocab_parallel_cross_entropy(scaled.contiguous(), targets.contiguous())


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   vocab_size: Optional[int] = None) -> torch.Tensor:
    """[b, S, V/tp] vocab-parallel logits -> [b, S-1] log p(token[i+1]) (target_logprobs of the shifted pair).
    Learner passes `vocab_size`; other callers of a padded model must too."""
    return target_logprobs(logits[:, :-1], tokens[:, 1:], temperature, vocab_size)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    vocab_size: Optional[int]) -> torch.Tensor:
    """One chunk: [c, h] hidden states x the output layer's [V/tp, h] weight -> [c] log-probs. The product is the
    output layer's (a ColumnParallelLinear without bias: input @ weight.t() in the weight's dtype)."""
    return target_logprobs(torch.matmul(hidden, weight.t()), targets, temperature, vocab_size)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                           lengths: torch.Tensor, temperature: float = 1.0, vocab_size: Optional[int] = None,
                           chunk_tokens: int = 1024, sequence_parallel: bool = False) -> torch.Tensor:
    """The last stage's hidden states -> [b, S-1] log p(token[i+1]) without ever holding the micro-batch's logits.

    `hidden`: [S, b, h] (under sequence parallelism this TP rank's [S/tp, b, h]), what GPTModel returns with
    post_process off (the final layernorm is the decoder's and has run). `weight`: the output layer's [V/tp, h]
    shard (the embedding under tied weights). Only real targets (position < length - 1) are scored; padded
    positions hold 0 (every caller masks them). The real tokens run through the output layer and the
    vocab-parallel log-softmax `chunk_tokens` at a time; with autograd on, each chunk is checkpointed
    (torch.utils.checkpoint, non-reentrant): its logits are freed after the forward and recomputed in the
    backward, so at most one chunk's logits and their gradient are alive at once.

    Tensor parallelism is the output layer's own: under sequence parallelism the hidden states are all-gathered
    first (backward: reduce-scatter), otherwise they enter the TP region by copy (backward: all-reduce), as
    ColumnParallelLinear does. Every TP rank runs the same chunks in the same order, so the CE's collectives and
    the recomputation's line up."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                               gather_from_sequence_parallel_region)

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
    # Float16Module returns the last stage's output upcast to fp32; back to the weight's dtype (exact: the values
    # were bf16/fp16) so each chunk's product is the one the output layer computes (and the SP gather moves bf16)
    hidden = hidden.to(weight.dtype)
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)
    real = (torch.arange(tokens.shape[1] - 1, device=tokens.device).unsqueeze(0)
            < (lengths.to(tokens.device) - 1).unsqueeze(1))                                  # [b, S-1]
    rows = hidden.transpose(0, 1)[:, : tokens.shape[1] - 1][real]                           # [N, h], contiguous
    if not sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        # after the transpose, not before: megatron-core 0.16.1's _CopyToModelParallelRegion.backward all-reduces
        # grad.contiguous() and returns grad itself (tensor_parallel/mappings.py _reduce), so a non-contiguous
        # gradient (a transpose's) would come back un-reduced; the gradient of `rows` is contiguous
        rows = copy_to_tensor_model_parallel_region(rows)
    targets = tokens[:, 1:][real]                                                          # [N]
    pieces = []
    for start in range(0, rows.shape[0], chunk_tokens):
        args = (rows[start: start + chunk_tokens], weight, targets[start: start + chunk_tokens], temperature,
                vocab_size)
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False,
                                                            preserve_rng_state=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    out = torch.zeros(real.shape, dtype=torch.float32, device=rows.device)
    return out.masked_scatter(real, torch.cat(pieces))


def chunking_conflicts(config) -> list[str]:
    """The megatron-core features (TransformerConfig keys) under which the chunked path would compute something
    else than GPTModel's output layer, or break a schedule, because that layer is never called (read against
    megatron-core 0.16.1 and the GPU stack's newer source): deferred embedding wgrad (the schedule drains
    activations the output layer would have buffered), multi-token prediction (its hidden states and loss ride on
    the output layer's input), fine-grained activation offloading, MuP's logit multiplier, MoE-overlap schedule
    plans (they bypass forward_step). None is set by model.bridge."""
    keys = ("defer_embedding_wgrad_compute", "mtp_num_layers", "fine_grained_activation_offloading", "use_mup",
            "overlap_moe_expert_parallel_comm")
    return [k for k in keys if getattr(config, k, None)]


def _output_weight(gpt) -> torch.Tensor:
    """The output layer's weight shard of a last-stage GPTModel (the word embedding's under tied weights)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


LossFn = Callable[[torch.Tensor, MicroBatch], "tuple[torch.Tensor, dict]"]


class Learner:
    """Owns the DDP-wrapped model chunks, the Megatron optimizer and the LR schedule."""

    def __init__(self, models: list, optim: OptimConfig, learner: LearnerConfig, pad_id: int = 0,
                 temperature: float = 1.0, trainable: bool = True):
        """trainable=False: a frozen forward-only model (e.g. the KL reference): no DDP, no optimizer."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg, self.optim_cfg = learner, optim
        self.pad_id, self.temperature = pad_id, temperature
        self.ps = ps
        config = models[0].config
        # the real vocabulary of a model padded for TP (model.bridge sets it on every chunk); logits past it are masked
        # (set on the GPTModel itself: DDP and, in bf16/fp16, Float16Module wrap it without passing attributes on)
        self.vocab_size = _real_vocab_size(models[0])
        self.device = next(models[0].parameters()).device
        self.step = 0
        conflicts = chunking_conflicts(config) if learner.logprob_chunk_tokens else []
        if conflicts:
            raise ConfigError(f"learner.logprob_chunk_tokens={learner.logprob_chunk_tokens} bypasses the model's "
                              f"output layer, which these megatron-core features need: {', '.join(conflicts)}; "
                              "set learner.logprob_chunk_tokens=0 (the whole-logits path)")
        if not trainable:
            self.models, self.config, self.optimizer, self.scheduler = models, config, None, None
            for m in models:
                m.requires_grad_(False)
            return
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=optim.use_distributed_optimizer,
            overlap_grad_reduce=False, bucket_size=None)
        self.models = [DistributedDataParallel(config, ddp_config, m) for m in models]
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.models]
        if len(self.models) == 1:
            config.no_sync_func = config.no_sync_func[0]
        if learner.recompute:
            if self.device.type != "cuda":
                raise ConfigError("learner.recompute=true is GPU-only: on CPU megatron-core 0.16.1 re-runs the "
                                  "forward inside autograd, where the CPU workarounds do not reach "
                                  "(transformer/utils.py:35 device='cuda'); set learner.recompute=false")
            config.recompute_granularity, config.recompute_method, config.recompute_num_layers = "full", "uniform", 1
        self.config = config
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer), self.models)
        self.scheduler = OptimizerParamScheduler(self.optimizer, **optim.lr_schedule())

    # ---------------------------------------------------------------- batching
    def _micro_batches(self, sequences, fields) -> list[MicroBatch]:
        lengths = [len(s) for s in sequences]
        if min(lengths, default=0) < 2:
            raise ValueError("every sequence needs at least 2 tokens (a prompt token and a target)")
        if max(lengths) > self.cfg.max_seq_len:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds learner.max_seq_len="
                             f"{self.cfg.max_seq_len}; raise it or shorten rollouts")
        dp_rank, dp_size = self.ps.get_data_parallel_rank(), self.ps.get_data_parallel_world_size()
        mine = split_over_dp(lengths, dp_size)[dp_rank]
        multiple = self.ps.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
        if not mine:      # fewer sequences than DP ranks: run one zero-weight copy so collectives line up
            return [collate([0], sequences, fields, self.pad_id, self.device, weight=0.0, multiple=multiple)]
        return [collate(group, sequences, fields, self.pad_id, self.device, multiple=multiple)
                for group in pack_by_length(mine, lengths, self.cfg.micro_batch_tokens)]

    def _run(self, batches: list[MicroBatch], loss_func, forward_only: bool):
        """Megatron's schedule over `batches`; on the last stage `loss_func(micro_batch, logprobs[b, S-1])`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_attr_wrapped_model

        chunk = self.cfg.logprob_chunk_tokens

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            positions = torch.arange(mb.tokens.shape[1], device=self.device).unsqueeze(0).expand_as(mb.tokens)
            gpt = get_attr_wrapped_model(model, "post_process", return_model_obj=True)
            if not (chunk and gpt.post_process):        # not the last stage, or learner.logprob_chunk_tokens=0
                logits = model(input_ids=mb.tokens, position_ids=positions, attention_mask=None)
                return logits, lambda out: loss_func(
                    mb, token_logprobs(out, mb.tokens, self.temperature, self.vocab_size))
            gpt.post_process = False        # GPTModel then returns its hidden states, skipping the output layer
            try:
                hidden = model(input_ids=mb.tokens, position_ids=positions, attention_mask=None)
            finally:
                gpt.post_process = True
            return hidden, lambda out: loss_func(mb, chunked_token_logprobs(
                out, _output_weight(gpt), mb.tokens, mb.lengths, self.temperature, self.vocab_size, chunk,
                self.config.sequence_parallel))

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=self.models,
            num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=forward_only)

    def _reports_results(self) -> bool:
        """One rank per DP replica reports: the last PP stage, TP rank 0."""
        return self.ps.is_pipeline_last_stage() and self.ps.get_tensor_model_parallel_rank() == 0

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def compute_logprobs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-token log-probs (length L-1 each) of every sequence, returned on every rank."""
        for m in self.models:
            m.eval()
        batches = self._micro_batches(sequences, None)
        offsets = [0]
        for s in sequences:
            offsets.append(offsets[-1] + len(s) - 1)
        flat = torch.zeros(offsets[-1], dtype=torch.float32, device=self.device)

        def collect(mb, lp):
            if mb.weight and self._reports_results():
                for row, i in enumerate(mb.indices):
                    flat[offsets[i]: offsets[i + 1]] = lp[row, : offsets[i + 1] - offsets[i]]
            return torch.zeros((), device=self.device), {}

        self._run(batches, collect, forward_only=True)
        if dist.is_initialized():
            dist.all_reduce(flat)
        return [flat[offsets[i]: offsets[i + 1]].clone() for i in range(len(sequences))]

    def _forward_backward(self, sequences, fields, loss_fn: LossFn) -> dict:
        """Zero the grad buffers, then accumulate d(batch loss)/d(params) into param.main_grad (DP-reduced)."""
        for m in self.models:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self._micro_batches(sequences, fields)
        scale = len(batches) * self.ps.get_data_parallel_world_size()
        sums: dict[str, float] = {}

        def loss_func(mb, logprobs):
            loss, metrics = loss_fn(logprobs, mb)
            loss = loss * mb.weight
            if mb.weight and self.ps.get_tensor_model_parallel_rank() == 0:
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            return loss * scale, {}

        self._run(batches, loss_func, forward_only=False)
        metrics = self._sum_over_replicas(sums)
        metrics["micro_batches"] = float(len(batches))
        return metrics

    def train_step(self, sequences: list[torch.Tensor], fields: list[dict], loss_fn: LossFn) -> dict:
        """One optimizer step over all `sequences` (the full batch, identical on every rank).

        `loss_fn(logprobs[b, S-1], micro_batch) -> (loss, metrics)` must return this micro-batch's share of
        the global loss (sum over its tokens of the per-token terms divided by a global normaliser carried
        in `fields`), so that the sum over all micro-batches and DP ranks is the batch loss; metrics are
        summed the same way. Megatron divides each micro-batch loss by the number of micro-batches and DDP
        averages gradients over DP ranks; both are undone here, so gradients are exact for any aggregation.
        """
        metrics = self._forward_backward(sequences, fields, loss_fn)
        if not math.isfinite(metrics.get("loss", 0.0)):       # every rank sees the same (gathered) loss
            for m in self.models:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            metrics.update(grad_norm=math.nan, lr=self.optimizer.param_groups[0]["lr"], update_ok=0.0)
            return metrics
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
            self.step += 1
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                       lr=self.optimizer.param_groups[0]["lr"], update_ok=float(bool(update_ok)))
        return metrics

    def local_gradients(self, sequences, fields, loss_fn: LossFn, select: Callable[[str], bool]) -> dict:
        """Gradient of the batch loss (not applied) for the selected parameters this rank holds, keyed by
        Megatron name: the TP shard of partitioned weights, the full tensor otherwise. Grad buffers are
        cleared again afterwards."""
        if self.optim_cfg.use_distributed_optimizer and self.ps.get_data_parallel_world_size() > 1:
            raise ValueError("local_gradients needs optim.use_distributed_optimizer=false when DP > 1: the "
                             "distributed optimizer reduce-scatters gradients, so no rank holds them whole")
        self._forward_backward(sequences, fields, loss_fn)
        grads = {name: p.main_grad.detach().float().clone()
                 for name, p in self.unwrapped_models()[0].named_parameters() if select(name)}
        for m in self.models:
            m.zero_grad_buffer()
        return grads

    def _sum_over_replicas(self, sums: dict) -> dict:
        if not dist.is_initialized():
            return dict(sums)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sums if self._reports_results() else {})
        total: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def unwrapped_models(self) -> list:
        return [getattr(m, "module", m) if self.optimizer is not None else m for m in self.models]


def build_learner(model, parallel, optim: OptimConfig, learner: LearnerConfig, *, pad_id: int = 0,
                  temperature: float = 1.0, seed: int = 1234, reference: bool = False, hf_config=None):
    """A Learner (and its bridge) from an HF directory and a layout: the recipe every caller uses.

    `model`: config.ModelConfig (path, dtype, spec, trust_remote_code); `parallel`: config.ParallelConfig.
    Starts the process groups (model.bridge.open_model), builds the trainable Learner and, with `reference`,
    a frozen copy for the KL term; `hf_config` as in open_model. Returns (LaunchEnv, HFBridge, Learner, reference
    Learner or None)."""
    from .model.bridge import open_model

    launch, bridge = open_model(model, parallel, seed=seed, hf_config=hf_config)
    policy = Learner(bridge.build(), optim, learner, pad_id=pad_id, temperature=temperature)
    ref = None
    if reference:
        ref = Learner(bridge.build(), optim, learner, pad_id=pad_id, temperature=temperature, trainable=False)
    return launch, bridge, policy, ref
