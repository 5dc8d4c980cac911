"""The learner's update batch: built from rollout groups, given its log-probs, split into mini-batches, scored.

    groups (prompt ids, completions, rewards, correct)
      --(group_advantages over ALL completions of a group)--> A[g, i]
      --(selector: all = GRPO, binary = BPPO; pair weighting)--> which completions train, with which advantage
      --(PrefixRule: keep the first k response tokens, per response or per pair; the suffix is dropped, not
         masked)--> training sequences
      --(attach_logprobs: learner OLD_LOGPROBS, reference REF_LOGPROBS; engine/learner mismatch)--> UpdateBatch
      --(split_batch)--> mini-batches --(policy_loss_fn: clipped PG loss, the batch's normaliser)--> Learner.train_step
    each sequence = prompt + kept response; per-token fields (length L-1, index t predicts token t+1), by name:
      MASK             1 on the kept response tokens' targets
      ADVANTAGE        the completion's advantage on every position
      ENGINE_LOGPROBS  the engine's log-prob of each kept response token (0 elsewhere)
      OLD_LOGPROBS     the learner's log-probs before the update (attach_logprobs)
      REF_LOGPROBS     the frozen reference model's log-probs (attach_logprobs; only with algorithm.kl_coef)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .algorithms import (PrefixRule, get_selector, group_advantages, policy_loss, selector_options,
                         weight_selected_advantages)
from .rollout.consistency import logprob_mismatch
from .seeds import selection_seed

# Names of the per-token fields (the learner pads them and hands them to the loss by these names).
MASK = "mask"
ADVANTAGE = "adv"
ENGINE_LOGPROBS = "rollout"
OLD_LOGPROBS = "old"
REF_LOGPROBS = "ref"


@dataclass
class Group:
    prompt_id: str
    prompt_ids: list[int]
    reference: str
    completions: list = field(default_factory=list)    # rollout.Completion
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)


@dataclass
class UpdateBatch:
    sequences: list[torch.Tensor]
    fields: list[dict]
    prompt_lengths: list[int]
    keep_lengths: list[int]
    response_lengths: list[int]
    origin: list[tuple[int, int]]                       # (group index, completion index) of each sequence
    counts: dict
    rollout_tokens: float = 0                           # response tokens of every completion of the groups
    rollout_sequences: float = 0                        # completions of the groups (a mini-batch: its share)

    @property
    def empty(self) -> bool:
        return not self.sequences

    @property
    def tokens(self) -> int:
        return sum(self.keep_lengths)

    def subset(self, idx: list[int], share: float) -> "UpdateBatch":
        """The sequences `idx`, carrying `share` of the rollout counts (for the `rollout` loss normaliser)."""
        return UpdateBatch([self.sequences[i] for i in idx], [self.fields[i] for i in idx],
                           [self.prompt_lengths[i] for i in idx], [self.keep_lengths[i] for i in idx],
                           [self.response_lengths[i] for i in idx], [self.origin[i] for i in idx], dict(self.counts),
                           self.rollout_tokens * share, self.rollout_sequences * share)


def dense(groups: list[Group]):
    """Ragged groups -> rewards, correct, lengths, valid as [num_groups, G_max] tensors."""
    width = max((len(g.completions) for g in groups), default=0)
    rewards = torch.zeros(len(groups), width, dtype=torch.float64)
    correct = torch.zeros(len(groups), width, dtype=torch.bool)
    lengths = torch.zeros(len(groups), width, dtype=torch.long)
    valid = torch.zeros(len(groups), width, dtype=torch.bool)
    for gi, g in enumerate(groups):
        n = len(g.completions)
        rewards[gi, :n] = torch.tensor(g.rewards, dtype=torch.float64)
        correct[gi, :n] = torch.tensor(g.correct, dtype=torch.bool)
        lengths[gi, :n] = torch.tensor([len(c.token_ids) for c in g.completions], dtype=torch.long)
        valid[gi, :n] = True
    return rewards, correct, lengths, valid


def prefix_rule(algo) -> PrefixRule:
    """config.AlgorithmConfig -> the prefix rule (validated there key by key)."""
    return PrefixRule(mode=algo.resolved_prefix(), ratio=algo.prefix_ratio, tokens=algo.prefix_tokens,
                      min_tokens=algo.prefix_min_tokens, max_tokens=algo.prefix_max_tokens,
                      schedule=tuple(tuple(p) for p in algo.prefix_schedule) or None)


def build_update_batch(groups: list[Group], algo, prefix_rule: PrefixRule, step: int,
                       step_seed: int = 0) -> UpdateBatch:
    """`algo`: config.AlgorithmConfig (advantage, selector, pair_weighting, ...); `step` drives the prefix
    schedule, `step_seed` (seeds.rollout_step_seed) a seeded selector. Correctness is the reward function's own
    `correct` flag (Group.correct), as the sampling schedule saw it."""
    rewards, correct, lengths, valid = dense(groups)
    advantages = group_advantages(rewards, mode=algo.advantage, eps=algo.adv_eps, valid=valid)
    name = algo.resolved_selector()
    options = {"seed": selection_seed(step_seed)} if "seed" in selector_options(name) else {}
    selection = get_selector(name, **options)(correct, lengths, advantages, valid)
    weights = weight_selected_advantages(advantages, correct, selection.mask, valid, algo.pair_weighting)
    rows, cols = selection.mask.nonzero(as_tuple=True)
    keep = prefix_rule.group_lengths(lengths, correct, selection.mask, step)[rows, cols]
    out = UpdateBatch([], [], [], [], [], [], dict(selection.counts), rollout_tokens=int(lengths[valid].sum()),
                      rollout_sequences=int(valid.sum()))
    for gi, ci, k in zip(rows.tolist(), cols.tolist(), keep.tolist()):
        if k < 1:
            continue
        group, completion = groups[gi], groups[gi].completions[ci]
        prompt_len = len(group.prompt_ids)
        tokens = torch.tensor(group.prompt_ids + list(completion.token_ids[:k]), dtype=torch.long)
        mask = torch.zeros(len(tokens) - 1)
        mask[prompt_len - 1:] = 1.0
        rollout = torch.zeros(len(tokens) - 1)
        rollout[prompt_len - 1:] = completion.logprobs[:k].float()
        out.sequences.append(tokens)
        out.fields.append({MASK: mask, ADVANTAGE: torch.full((len(tokens) - 1,), float(weights[gi, ci])),
                           ENGINE_LOGPROBS: rollout})
        out.prompt_lengths.append(prompt_len)
        out.keep_lengths.append(k)
        out.response_lengths.append(len(completion.token_ids))
        out.origin.append((gi, ci))
    out.counts.update(selected_sequences=len(out.sequences), selected_tokens=out.tokens,
                      selected_response_tokens_full=sum(out.response_lengths),
                      mixed_groups=int(sum(1 for g in groups if 0 < sum(g.correct) < len(g.correct))))
    return out


def attach_logprobs(batch: UpdateBatch, learner, ref=None) -> dict:
    """Score the batch with the learner (OLD_LOGPROBS) and the reference (REF_LOGPROBS, when given); returns the
    engine/learner mismatch over the trained response tokens (rollout.consistency.logprob_mismatch)."""
    old = learner.compute_logprobs(batch.sequences)
    ref_logprobs = ref.compute_logprobs(batch.sequences) if ref is not None else None
    for i, fields in enumerate(batch.fields):
        fields[OLD_LOGPROBS] = old[i].cpu()
        if ref_logprobs is not None:
            fields[REF_LOGPROBS] = ref_logprobs[i].cpu()
    masks = [f[MASK].bool() for f in batch.fields]
    return logprob_mismatch([f[ENGINE_LOGPROBS][m] for f, m in zip(batch.fields, masks)],
                            [f[OLD_LOGPROBS][m] for f, m in zip(batch.fields, masks)])


def split_batch(batch: UpdateBatch, parts: int, seed: int) -> list[UpdateBatch]:
    """Mini-batches for several optimizer steps per rollout, by whole groups: a BPPO pair or a GRPO group never
    spans two optimizer steps. The groups are shuffled with `seed` (one per step and epoch) and dealt round-robin;
    each mini-batch carries its share of the rollout counts. Fewer groups than `parts` give fewer mini-batches."""
    order = sorted({gi for gi, _ in batch.origin})
    if parts <= 1 or len(order) <= 1:
        return [batch]
    random.Random(seed).shuffle(order)
    chunks = [order[p::parts] for p in range(min(parts, len(order)))]
    members = [set(chunk) for chunk in chunks]
    return [batch.subset([i for i, (gi, _) in enumerate(batch.origin) if gi in groups], len(groups) / len(order))
            for groups in members]


def loss_normalizer(batch: UpdateBatch, aggregation: str, normalizer: str = "trained") -> float:
    """The global denominator of the chosen aggregation for this (mini-)batch (docs/algorithm.md section 3):
    trained: what the learner trains (its tokens for token-mean, its sequences otherwise);
    rollout: what GRPO would train on the same groups (every completion's full response tokens / every completion)."""
    if normalizer == "rollout":
        return float(max(batch.rollout_tokens if aggregation == "token-mean" else batch.rollout_sequences, 1))
    if aggregation == "token-mean":
        return float(max(batch.tokens, 1))
    return float(max(len(batch.sequences), 1))


def policy_loss_fn(algo, batch: UpdateBatch):
    """The loss of one optimizer step on `batch` (a mini-batch), as Learner.train_step calls it per micro-batch:
    (log-probs, MicroBatch) -> (loss, token-weighted sums for the step's metrics)."""
    normalizer = loss_normalizer(batch, algo.aggregation, algo.normalizer)

    def loss_fn(logprobs, mb):
        f = mb.fields
        loss, m = policy_loss(
            logprobs, f[OLD_LOGPROBS], f[ADVANTAGE], f[MASK], clip_low=algo.clip_low, clip_high=algo.clip_high,
            aggregation=algo.aggregation, norm_constant=algo.norm_constant, normalizer=normalizer,
            kl_coef=algo.kl_coef, ref_logprobs=f.get(REF_LOGPROBS), kl_estimator=algo.kl_estimator,
            rollout_logprobs=f[ENGINE_LOGPROBS], rollout_is=algo.rollout_is, rollout_is_cap=algo.rollout_is_cap)
        tokens = m["tokens"]
        return loss, {"loss_tokens": tokens, "clip_frac_x_tokens": m["clip_frac"] * tokens,
                      "approx_kl_x_tokens": m["approx_kl"] * tokens, "kl_x_tokens": m["kl"] * tokens}

    return loss_fn
