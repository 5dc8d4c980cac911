"""The BPPO / GRPO actor-learner loop: `megatron-bppo train --config X.yaml [key=value ...]`.

One step (`rl_step`), the same on a laptop CPU and on a multi-node GPU job:
    prompts --(sync: learner weights -> engine)--> (rollout: adaptive rounds + rewards) --> groups
    groups --(advantages over each full group, selection, prefix cut)--> update batch
    update batch --(learner: old / reference log-probs, clipped PG loss, optimizer steps)--> new weights
Around it: evaluation on held-out prompts, atomic checkpoints with automatic resume, metrics (console, jsonl,
TensorBoard, W&B), and SIGTERM / SIGUSR1 handling (save, then exit with EXIT_PREEMPTED).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from .batch import build_update_batch, loss_normalizer, split_batch
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .collect import collect_groups
from .config import Config, ConfigError
from .evaluation import evaluate

logger = logging.getLogger(__name__)
EXIT_PREEMPTED = 75            # sysexits EX_TEMPFAIL: stopped by a signal after saving; requeue to resume
INSTRUCTIONS = {"direct": "DIRECT_INSTRUCTION", "cot": "COT_INSTRUCTION", "gsm8k": "GSM8K_INSTRUCTION",
                "boxed": "BOXED_INSTRUCTION"}


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; `requested()` agrees on it across ranks (a collective: call on all)."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Run:
    cfg: Config
    rank: int
    bridge: Any
    learner: Any
    ref: Any
    engine: Any
    train_prompts: list
    eval_prompts: list
    sampler: Any
    scheduler: Any
    prefix_rule: Any
    reward_fn: Any
    metrics: Any
    stop: StopRequest
    step: int = 0
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ set-up
def render_prompts(cfg: Config, tokenizer, examples) -> list:
    from . import data

    text = INSTRUCTIONS.get(cfg.data.instruction)
    instruction = getattr(data, text) if text else (None if cfg.data.instruction == "none" else cfg.data.instruction)
    fmt = data.ChatFormat(system_prompt=cfg.data.system_prompt,
                          instruction_prefix=instruction if cfg.data.instruction_position == "prefix" else None,
                          instruction_suffix=instruction if cfg.data.instruction_position == "suffix" else None,
                          max_prompt_tokens=cfg.rollout.max_model_len - cfg.sampling.max_tokens,
                          on_too_long=cfg.data.on_too_long)
    try:
        rendered = data.PromptRenderer(tokenizer, fmt).render_all(examples)
    except data.PromptTooLongError as e:
        raise ConfigError(f"{e}: raise rollout.max_model_len, lower sampling.max_tokens, or set "
                          "data.on_too_long=skip") from None
    except data.ChatTemplateError as e:
        raise ConfigError(f"data: {e}") from None
    if not rendered:
        raise ConfigError("no prompt fits rollout.max_model_len - sampling.max_tokens")
    return rendered


def load_prompts(cfg: Config, tokenizer):
    from .data import DatasetError, open_dataset

    generated = cfg.data.train.startswith("arithmetic")
    try:
        train = open_dataset(cfg.data.train, split="train", seed=cfg.data.seed, size=cfg.data.train_size)
        eval_source = cfg.data.eval or (cfg.data.train if generated else "")
        if not eval_source:
            raise ConfigError("data.eval is empty: give a held-out prompt file (only generated tasks have "
                              "a built-in test split)")
        held_out = open_dataset(eval_source, split="test", seed=cfg.data.seed + 1, size=cfg.data.eval_size)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    return render_prompts(cfg, tokenizer, train), render_prompts(cfg, tokenizer, held_out)[: cfg.data.eval_size]


def setup(cfg: Config, stop: Optional[StopRequest] = None) -> Run:
    """Everything is checked before any model is built: config, layout, model dir, data, reward."""
    from transformers import AutoTokenizer

    from .data import PromptSampler
    from .distributed import init_distributed, print_rank0
    from .learner import Learner
    from .metrics import MetricsLogger
    from .model.bridge import HFBridge, model_dims, read_hf_config
    from .rewards import get_reward, validate_reward_kwargs
    from .rollout import VLLMEngine

    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a Hugging Face checkpoint directory")
    hf_config = read_hf_config(cfg.model.path, cfg.model.trust_remote_code)
    try:
        reward_fn = get_reward(cfg.reward.name)
        validate_reward_kwargs(cfg.reward.name, cfg.reward.kwargs)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"reward: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train_prompts, eval_prompts = load_prompts(cfg, tokenizer)
    launch, _ = init_distributed(cfg.parallel, model_dims(hf_config), seed=cfg.learner.seed)
    print_rank0(f"[train] {cfg.algorithm.name} on {cfg.model.path}: {len(train_prompts)} train / "
                f"{len(eval_prompts)} held-out prompts, world {launch.world_size} (TP{cfg.parallel.tp} "
                f"PP{cfg.parallel.pp}), rollout TP{cfg.rollout.tp}")
    bridge = HFBridge(cfg.model.path, cfg.model.dtype, cfg.model.spec, cfg.model.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Learner log-probs at the sampling temperature: the policy the engine sampled from (verl does the same)
    temperature = cfg.sampling.temperature
    learner = Learner(bridge.build(), cfg.optim, cfg.learner, pad_id=pad, temperature=temperature)
    ref = None
    if cfg.algorithm.kl_coef:
        ref = Learner(bridge.build(), cfg.optim, cfg.learner, pad_id=pad, temperature=temperature, trainable=False)
    engine = VLLMEngine(cfg.model.path, cfg.rollout, dtype=cfg.model.dtype,
                        trust_remote_code=cfg.model.trust_remote_code)
    run = Run(cfg, launch.rank, bridge, learner, ref, engine, train_prompts, eval_prompts,
              PromptSampler(len(train_prompts), seed=cfg.data.seed), cfg.algorithm.scheduler(),
              cfg.algorithm.prefix_rule(), reward_fn, None, stop or StopRequest())
    resumed = resume(run)
    run.metrics = MetricsLogger(cfg.run_dir, use_tensorboard=cfg.train.tensorboard,
                                wandb={"project": cfg.train.wandb_project} if cfg.train.wandb_project else None,
                                enabled=launch.rank == 0, resume_step=run.step if resumed else None,
                                total_steps=cfg.train.steps)
    if launch.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=str)
    return run


def resume(run: Run) -> bool:
    cfg = run.cfg
    path = latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.dir and cfg.checkpoint.resume else None
    if path is None:
        return False
    state = load_checkpoint(path, run.learner.models, run.learner.optimizer, run.learner.scheduler)
    run.step = run.learner.step = state["step"]
    extra = state["extra"]
    if "sampler" in extra:
        run.sampler.load_state_dict(extra["sampler"])
        run.scheduler.load_state_dict(extra["scheduler"])
        run.summary = extra.get("summary", {})
    if run.rank == 0:
        print(f"[train] resumed from {path} at step {run.step}", flush=True)
    return True


def save(run: Run, step: int, sampler_state=None, scheduler_state=None) -> str:
    cfg = run.cfg
    extra = {"sampler": sampler_state or run.sampler.state_dict(),
             "scheduler": scheduler_state or run.scheduler.state_dict(), "summary": run.summary}
    return save_checkpoint(cfg.checkpoint.dir, step, run.learner.models, run.learner.optimizer,
                           run.learner.scheduler, hf_source_dir=cfg.model.path, extra_state=extra,
                           keep_last=cfg.checkpoint.keep_last, layout={"tp": cfg.parallel.tp, "pp": cfg.parallel.pp})


# ------------------------------------------------------------------------------------------------ one step
def make_loss_fn(algo, normalizer: float):
    from .algorithms import policy_loss

    def loss_fn(logprobs, mb):
        f = mb.fields
        loss, m = policy_loss(
            logprobs, f["old"], f["adv"], f["mask"], clip_low=algo.clip_low, clip_high=algo.clip_high,
            aggregation=algo.aggregation, norm_constant=algo.norm_constant, normalizer=normalizer,
            kl_coef=algo.kl_coef, ref_logprobs=f.get("ref"), kl_estimator=algo.kl_estimator,
            rollout_logprobs=f["rollout"], rollout_is=algo.rollout_is, rollout_is_cap=algo.rollout_is_cap)
        tokens = m["tokens"]
        return loss, {"loss_tokens": tokens, "clip_frac_x_tokens": m["clip_frac"] * tokens,
                      "approx_kl_x_tokens": m["approx_kl"] * tokens, "kl_x_tokens": m["kl"] * tokens}

    return loss_fn


def rl_step(run: Run, step: int, timer) -> Optional[dict]:
    """One step; returns its metrics, or None when a stop signal abandoned it before the update."""
    from .rollout import check_mismatch, logprob_mismatch
    from .weight_sync import sync_weights

    cfg, algo, learner = run.cfg, run.cfg.algorithm, run.learner
    snapshot = run.sampler.state_dict(), run.scheduler.state_dict()
    prompts = [run.train_prompts[i] for i in run.sampler.next_indices(cfg.data.prompts_per_step)]
    with timer("sync"):
        sync = sync_weights(run.bridge, learner.unwrapped_models(), run.engine, cfg.rollout.bucket_bytes)
    with timer("rollout"):
        draw = (lambda n: [run.train_prompts[i] for i in run.sampler.next_indices(n)]) if algo.target_pairs else None
        rollout = collect_groups(run.engine, run.scheduler, prompts, cfg.sampling, run.reward_fn,
                                 cfg.reward.kwargs, seed=(cfg.sampling.seed or 0) + 7919 * step, draw_more=draw)
        run.engine.sleep()
    timer.times["reward"] = rollout.reward_seconds           # scored between rounds: not engine time
    timer.times["rollout"] -= rollout.reward_seconds
    if run.stop.requested():                                  # abandon the step: nothing was trained yet
        if cfg.checkpoint.dir:
            save(run, step - 1, *snapshot)
        return None
    batch = build_update_batch(rollout.groups, algo, run.prefix_rule, step)
    metrics = rollout_metrics(rollout, batch, sync)
    if cfg.train.dump_batches and run.rank == 0:
        dump_batch(cfg.run_dir, step, rollout.groups, batch)
    if batch.empty:
        logger.warning("step %d: no group has both a correct and an incorrect completion; update skipped", step)
        metrics["skipped/no_update_set"] = 1
        return metrics
    with timer("logprob"):
        old = learner.compute_logprobs(batch.sequences)
        ref = run.ref.compute_logprobs(batch.sequences) if run.ref is not None else None
        for i, fields in enumerate(batch.fields):
            fields["old"] = old[i].cpu()
            if ref is not None:
                fields["ref"] = ref[i].cpu()
        mask = [f["mask"].bool() for f in batch.fields]
        mismatch = logprob_mismatch([f["rollout"][m] for f, m in zip(batch.fields, mask)],
                                    [o.cpu()[m] for o, m in zip(old, mask)])
        check_mismatch(mismatch, cfg.rollout.logprob_mismatch_warn, step)
        metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
    with timer("update"):
        updates = []
        for _ in range(algo.epochs):
            for mini in split_batch(batch, algo.mini_batches):
                updates.append(learner.train_step(mini.sequences, mini.fields,
                                                  make_loss_fn(algo, loss_normalizer(mini, algo.aggregation))))
    metrics.update(update_metrics(updates))
    return metrics


def dump_batch(run_dir: str, step: int, groups, batch):
    """What the rollout produced and exactly which token sequences the learner gets (for tests / debugging)."""
    os.makedirs(os.path.join(run_dir, "batches"), exist_ok=True)
    torch.save({"groups": [{"prompt_ids": g.prompt_ids, "completions": [list(c.token_ids) for c in g.completions],
                            "rewards": g.rewards, "correct": g.correct} for g in groups],
                "sequences": [s.tolist() for s in batch.sequences], "keep": batch.keep_lengths,
                "origin": batch.origin, "adv": [float(f["adv"][0]) for f in batch.fields]},
               os.path.join(run_dir, "batches", f"step_{step:05d}.pt"))


def rollout_metrics(rollout, batch, sync) -> dict:
    correct = [c for g in rollout.groups for c in g.correct]
    rewards = [r for g in rollout.groups for r in g.rewards]
    lengths = [len(c.token_ids) for g in rollout.groups for c in g.completions]
    out = {"reward/mean": sum(rewards) / max(len(rewards), 1), "accuracy": sum(correct) / max(len(correct), 1),
           "response_length/mean": sum(lengths) / max(len(lengths), 1), "samples": len(lengths),
           "groups": len(rollout.groups), "rollout/rounds": rollout.rounds,
           "selected/sequences": batch.counts["selected_sequences"], "selected/tokens": batch.counts["selected_tokens"],
           "selected/full_response_tokens": batch.counts["selected_response_tokens_full"],
           "groups_mixed": batch.counts["mixed_groups"],
           "sync/bytes": sync.bytes, "sync/bytes_per_s": sync.bytes_per_s}
    out.update({f"sched/{k}": v for k, v in rollout.counters.items() if v})
    return out


def update_metrics(updates: list[dict]) -> dict:
    tokens = sum(u.get("loss_tokens", 0.0) for u in updates) or 1.0
    last = updates[-1]
    return {"loss": sum(u.get("loss", 0.0) for u in updates) / len(updates),
            "clip_frac": sum(u.get("clip_frac_x_tokens", 0.0) for u in updates) / tokens,
            "approx_kl": sum(u.get("approx_kl_x_tokens", 0.0) for u in updates) / tokens,
            "kl": sum(u.get("kl_x_tokens", 0.0) for u in updates) / tokens,
            "grad_norm": last["grad_norm"], "lr": last["lr"],
            "skipped/non_finite_updates": sum(1 for u in updates if not u["update_ok"])}


# ------------------------------------------------------------------------------------------------ loop
def run_eval(run: Run, step: int, label: str) -> dict:
    from .weight_sync import sync_weights

    cfg = run.cfg
    sync_weights(run.bridge, run.learner.unwrapped_models(), run.engine, cfg.rollout.bucket_bytes)
    result = evaluate(run.engine, run.eval_prompts, cfg.sampling, run.reward_fn, cfg.reward.kwargs,
                      cfg.eval.samples, seed=(cfg.sampling.seed or 0) + 104729)
    run.engine.sleep()
    run.metrics.log(step, result, console=False)
    run.metrics.print(f"[eval {label} @ step {step}] pass@1 {result['eval/accuracy']:.3f}  "
                      + (f"mean@{cfg.eval.samples} {result[f'eval/mean@{cfg.eval.samples}']:.3f}  "
                         if cfg.eval.samples else "")
                      + f"length mean {result['eval/response_length/mean']:.1f} "
                        f"median {result['eval/response_length/median']:.0f}")
    return result


def train(cfg: Config) -> int:
    from .metrics import PhaseTimer

    stop = StopRequest()          # first, so a signal during set-up is not fatal (honoured after set-up)
    run = setup(cfg, stop)
    timer = PhaseTimer()
    if run.step == 0 and cfg.eval.at_start and "before" not in run.summary:
        run.summary["before"] = run_eval(run, 0, "before")
    while run.step < cfg.train.steps:
        step = run.step + 1
        timer.reset()
        metrics = rl_step(run, step, timer)
        if metrics is None:
            return stop_exit(run, step - 1)
        run.step = step
        metrics.update(timer.metrics())
        run.summary.setdefault("step_times", []).append(metrics["time/step"])
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.train.steps:
            run_eval(run, step, "interval")
        run.metrics.log(step, metrics)
        last = step == cfg.train.steps
        stopping = run.stop.requested()
        if cfg.checkpoint.dir and (last or stopping or (cfg.checkpoint.save_interval
                                                        and step % cfg.checkpoint.save_interval == 0)):
            save(run, step)
        if stopping and not last:
            return stop_exit(run, step)
    finish(run)
    return 0


def stop_exit(run: Run, step: int) -> int:
    if run.cfg.checkpoint.dir:
        run.metrics.print(f"[train] stop signal: state saved at step {step}; exiting with {EXIT_PREEMPTED} "
                          f"(requeue the job to resume)")
    else:
        run.metrics.print(f"[train] stop signal at step {step}: checkpoint.dir is empty, nothing saved; exiting "
                          f"with {EXIT_PREEMPTED}")
    run.metrics.close()
    run.engine.close()
    return EXIT_PREEMPTED


def finish(run: Run):
    cfg = run.cfg
    after = run_eval(run, run.step, "after")
    before = run.summary.get("before", {})
    times = run.summary.get("step_times", [])
    summary = {"algorithm": cfg.algorithm.name, "steps": run.step,
               "accuracy_before": before.get("eval/accuracy"), "accuracy_after": after["eval/accuracy"],
               "mean_length_before": before.get("eval/response_length/mean"),
               "mean_length_after": after["eval/response_length/mean"],
               "time_per_step": sum(times) / len(times) if times else math.nan,
               "eval_before": before, "eval_after": after}
    if cfg.train.export_hf:
        run.bridge.save_hf(run.learner.unwrapped_models(), os.path.join(cfg.run_dir, "hf"))
    if run.rank == 0:
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        run.metrics.print(summary_table(summary))
        try:
            import sys
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
            from plot_metrics import plot_runs
            plot_runs([cfg.run_dir], [cfg.algorithm.name], os.path.join(cfg.run_dir, "plots"))
        except Exception as e:      # noqa: BLE001 -- plots are a convenience; the numbers are in summary.json
            logger.warning("plotting failed: %s", e)
    run.metrics.close()
    run.engine.close()


def summary_table(s: dict) -> str:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and v == v else "n/a"

    return "\n".join([
        f"{'':22s}{'before':>10s}{'after':>10s}",
        f"{'held-out accuracy':22s}{fmt(s['accuracy_before'], '10.3f')}{fmt(s['accuracy_after'], '10.3f')}",
        f"{'mean response length':22s}{fmt(s['mean_length_before'], '10.1f')}{fmt(s['mean_length_after'], '10.1f')}",
        f"{'time per step (s)':22s}{'':>10s}{fmt(s['time_per_step'], '10.1f')}"])
