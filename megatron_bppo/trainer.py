"""The BPPO / GRPO actor-learner loop: `megatron-bppo train --config X.yaml [key=value ...]`.

One step (`rl_step`), the same on a laptop CPU and on a multi-node GPU job, one call per arrow:
    learner weights --(weight_sync.sync_weights)--> engine
    prompts --(collect.collect_groups: streamed samples, adaptive scheduling, rewards)--> groups
    groups --(batch.build_update_batch: advantages over each full group, selection, prefix cut)--> update batch
    update batch --(batch.attach_logprobs: old / reference log-probs, engine mismatch)--> scored batch
    scored batch --(batch.split_batch, Learner.train_step with batch.policy_loss_fn)--> new weights
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
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from .batch import ADVANTAGE, attach_logprobs, build_update_batch, policy_loss_fn, prefix_rule, split_batch
from .checkpointing import load_checkpoint, resume_checkpoint, save_checkpoint
from .collect import collect_groups, sampling_schedule
from .config import Config
from .errors import ConfigError
from .evaluation import evaluate
from .metrics import MetricsLogger, PhaseTimer
from .run_lock import check_checkpoint_lock, take_checkpoint_lock
from .seeds import eval_seed, minibatch_seed, rollout_step_seed

if TYPE_CHECKING:
    from .algorithms import AdaptiveScheduler, PrefixRule
    from .data import PromptSampler, RenderedPrompt
    from .learner import Learner
    from .model.bridge import HFBridge
    from .rewards import RewardFn
    from .rollout import RolloutEngine

logger = logging.getLogger(__name__)
EXIT_PREEMPTED = 75            # sysexits EX_TEMPFAIL: stopped by a signal after saving; requeue to resume


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; `requested()` agrees on it across ranks (a collective: call on all)."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        from .platform import current_platform

        if not dist.is_initialized():      # asked after every engine step: no device round trip when alone
            return self.signal is not None
        # on the platform's device: NCCL (the default group on GPUs) has no CPU tensors
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=current_platform().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Run:
    cfg: Config
    rank: int
    bridge: HFBridge
    learner: Learner
    ref: Optional[Learner]                    # frozen KL reference (algorithm.kl_coef > 0)
    engine: RolloutEngine
    train_prompts: list[RenderedPrompt]
    eval_prompts: list[RenderedPrompt]
    sampler: PromptSampler                    # which prompts each step gets (resumable)
    sampling_schedule: AdaptiveScheduler      # how many completions each prompt gets (not the LR schedule)
    prefix_rule: PrefixRule
    reward_fn: RewardFn
    stop: StopRequest
    metrics: Optional[MetricsLogger] = None   # set once the resume step is known
    step: int = 0
    summary: dict = field(default_factory=dict)

    def prompts(self, indices: list[int]) -> list[RenderedPrompt]:
        return [self.train_prompts[i] for i in indices]


# ------------------------------------------------------------------------------------------------ set-up
def setup(cfg: Config, stop: Optional[StopRequest] = None, timer: Optional[PhaseTimer] = None) -> Run:
    """Everything a user can get wrong is checked before any model is built: config, model dir (and its weights'
    headers), reward, data, checkpoint.dir (its lock, what a resume would load, the data it was taken on), then the
    layout (build_learner checks it against the model before starting the process groups).
    `timer` gets the phases "setup/learner" and "setup/engine" (bench/system_costs.py records memory there)."""
    from transformers import AutoTokenizer

    from .data import PromptSampler, prompts_fingerprint, prompts_from_config
    from .distributed import print_rank0, process_group_timeout_s
    from .learner import build_learner
    from .model.bridge import read_hf_config
    from .platform import current_platform
    from .rewards import reward_from_config
    from .rollout import open_engine

    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a Hugging Face checkpoint directory")
    hf_config = read_hf_config(cfg.model.path, cfg.model.trust_remote_code)
    reward_fn = reward_from_config(cfg.reward)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train_prompts, eval_prompts = prompts_from_config(cfg, tokenizer)
    sampler = PromptSampler(len(train_prompts), seed=cfg.data.seed, fingerprint=prompts_fingerprint(train_prompts))
    resume_path = None
    if cfg.checkpoint.dir:
        # Every rank, before any process group exists, read-only: a refusal ends all ranks alike. Then rank 0
        # writes the lock (the other ranks wait until it names this launch; no other run writes here after it).
        check_checkpoint_lock(cfg.checkpoint.dir, break_lock=cfg.checkpoint.break_lock)
        resume_path = resume_checkpoint(cfg.checkpoint, sampler.state_dict(), cfg.optim)
        take_checkpoint_lock(cfg.checkpoint.dir, break_lock=cfg.checkpoint.break_lock,
                             wait_s=process_group_timeout_s(cfg.parallel))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    timer = timer or PhaseTimer()
    with timer("setup/learner"):
        # Learner log-probs at the sampling temperature: the policy the engine sampled from (verl does the same)
        launch, bridge, learner, ref = build_learner(cfg.model, cfg.parallel, cfg.optim, cfg.learner, pad_id=pad,
                                                     temperature=cfg.sampling.temperature, seed=cfg.learner.seed,
                                                     reference=bool(cfg.algorithm.kl_coef), hf_config=hf_config)
    print_rank0(f"[train] {cfg.algorithm.name} on {cfg.model.path}: {len(train_prompts)} train / "
                f"{len(eval_prompts)} held-out prompts, world {launch.world_size} (TP{cfg.parallel.tp} "
                f"PP{cfg.parallel.pp}), rollout TP{cfg.rollout.tp}; learner built in "
                f"{timer.times['setup/learner']:.1f}s")
    print_rank0("[train] library workarounds applied (platform/cpu_compat.py): "
                + (", ".join(current_platform().applied_workarounds) or "none"))
    with timer("setup/engine"):
        engine = open_engine(cfg.rollout, cfg.model.path, dtype=cfg.model.dtype,
                             trust_remote_code=cfg.model.trust_remote_code, hf_config=hf_config)
    run = Run(cfg, launch.rank, bridge, learner, ref, engine, train_prompts, eval_prompts,
              sampler, sampling_schedule(cfg.algorithm, cfg.sampling.seed),
              prefix_rule(cfg.algorithm), reward_fn, stop or StopRequest())
    resumed = resume(run, resume_path)
    run.metrics = MetricsLogger(cfg.run_dir, use_tensorboard=cfg.train.tensorboard,
                                wandb={"project": cfg.train.wandb_project} if cfg.train.wandb_project else None,
                                # a fresh start (-1) drops lines an earlier, killed attempt left behind
                                enabled=launch.rank == 0, resume_step=run.step if resumed else -1,
                                total_steps=cfg.train.steps)
    if launch.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=str)
    return run


def resume(run: Run, path: Optional[str]) -> bool:
    """Load the checkpoint `path` (setup's checkpointing.resume_checkpoint, checked before anything was built:
    the latest complete one, its train prompts matching), if any."""
    cfg = run.cfg
    if path is None:
        return False
    state = load_checkpoint(path, run.learner.models, run.learner.optimizer, run.learner.scheduler)
    run.step = run.learner.step = state["step"]
    extra = state["extra"]
    if "sampler" in extra:
        run.sampler.load_state_dict(extra["sampler"], strict=not cfg.checkpoint.allow_data_change)
        run.sampling_schedule.load_state_dict(extra["scheduler"])
        run.summary = extra.get("summary", {})
    if run.rank == 0:
        print(f"[train] resumed from {path} at step {run.step}", flush=True)
    return True


def save(run: Run, step: int, sampler_state=None, schedule_state=None) -> str:
    """Checkpoint at `step`; the data position and sampling schedule default to the current ones (a stop
    mid-step passes the snapshot taken before the step). "scheduler" in the saved state is the sampling schedule."""
    cfg = run.cfg
    extra = {"sampler": sampler_state or run.sampler.state_dict(),
             "scheduler": schedule_state or run.sampling_schedule.state_dict(), "summary": run.summary}
    return save_checkpoint(cfg.checkpoint.dir, step, run.learner.models, run.learner.optimizer,
                           run.learner.scheduler, hf_source_dir=cfg.model.path, extra_state=extra,
                           keep_last=cfg.checkpoint.keep_last, optimizer_format=cfg.checkpoint.optimizer_format)


# ------------------------------------------------------------------------------------------------ one step
def rl_step(run: Run, step: int, timer) -> Optional[dict]:
    """One step; returns its metrics, or None when a stop signal abandoned it before the update."""
    from .rollout import check_mismatch
    from .weight_sync import sync_weights

    cfg, algo, learner = run.cfg, run.cfg.algorithm, run.learner
    snapshot = run.sampler.state_dict(), run.sampling_schedule.state_dict()
    step_seed = rollout_step_seed(cfg.sampling.seed, step)
    taken: set[int] = set()                                   # no prompt twice in one step (draw-more included)

    def draw(n: int) -> list:
        indices = run.sampler.next_indices(n, exclude=taken)
        taken.update(indices)
        return run.prompts(indices)

    prompts = draw(cfg.data.prompts_per_step)
    with timer("sync"):
        sync = sync_weights(run.bridge, learner.unwrapped_models(), run.engine, cfg.rollout.bucket_bytes)
    with timer("rollout"):
        rollout = collect_groups(run.engine, run.sampling_schedule, prompts, cfg.sampling, run.reward_fn,
                                 cfg.reward.kwargs, seed=step_seed, draw_more=draw if algo.target_pairs else None,
                                 streaming=cfg.rollout.schedule == "stream", early_stop=algo.early_stop,
                                 stop=run.stop.requested)
        run.engine.sleep()
    timer.times["reward"] = rollout.reward_seconds           # scored between engine steps: not engine time
    timer.times["rollout"] -= rollout.reward_seconds
    if rollout.interrupted or run.stop.requested():           # abandon the step: nothing was trained yet
        if cfg.checkpoint.dir:
            save(run, step - 1, *snapshot)
        return None
    batch = build_update_batch(rollout.groups, algo, run.prefix_rule, step, step_seed)
    metrics = rollout_metrics(rollout, batch, sync)
    if cfg.train.dump_batches and run.rank == 0:
        dump_batch(cfg.run_dir, step, rollout.groups, batch)
    if batch.empty:
        logger.warning("step %d: no group has both a correct and an incorrect completion; update skipped", step)
        metrics["skipped/no_update_set"] = 1
        return metrics
    with timer("logprob"):
        mismatch = attach_logprobs(batch, learner, run.ref)
        check_mismatch(mismatch, cfg.rollout.logprob_mismatch_warn, step)
        metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
    with timer("update"):
        updates = [learner.train_step(mini.sequences, mini.fields, policy_loss_fn(algo, mini))
                   for epoch in range(algo.epochs)
                   for mini in split_batch(batch, algo.mini_batches, minibatch_seed(step_seed, epoch))]
    metrics.update(update_metrics(updates))
    return metrics


def dump_batch(run_dir: str, step: int, groups, batch):
    """What the rollout produced and exactly which token sequences the learner gets (for tests / debugging)."""
    os.makedirs(os.path.join(run_dir, "batches"), exist_ok=True)
    torch.save({"groups": [{"prompt_ids": g.prompt_ids, "completions": [list(c.token_ids) for c in g.completions],
                            "rewards": g.rewards, "correct": g.correct} for g in groups],
                "sequences": [s.tolist() for s in batch.sequences], "keep": batch.keep_lengths,
                "origin": batch.origin, "adv": [float(f[ADVANTAGE][0]) for f in batch.fields]},
               os.path.join(run_dir, "batches", f"step_{step:05d}.pt"))


def rollout_metrics(rollout, batch, sync) -> dict:
    # finished samples only: a stopped one (algorithm.early_stop=as_incorrect) counts as wrong in its group's
    # statistics but says nothing about the policy's accuracy or length
    finished = [(c, r, ok) for g in rollout.groups for c, r, ok in zip(g.completions, g.rewards, g.correct)
                if c.finish_reason != "abort"]
    n = max(len(finished), 1)
    out = {"reward/mean": sum(r for _, r, _ in finished) / n, "accuracy": sum(ok for _, _, ok in finished) / n,
           "response_length/mean": sum(len(c.token_ids) for c, _, _ in finished) / n, "samples": len(finished),
           "groups": len(rollout.groups), "rollout/engine_steps": rollout.engine_steps,
           **{f"rollout/tokens_{k}": v for k, v in rollout.token_accounting(batch.tokens).items()},
           "rollout/samples_stopped": rollout.stopped_samples,
           "selected/sequences": batch.counts["selected_sequences"], "selected/tokens": batch.counts["selected_tokens"],
           "selected/full_response_tokens": batch.counts["selected_response_tokens_full"],
           "groups_mixed": batch.counts["mixed_groups"],
           "sync/bytes": sync.bytes, "sync/bytes_per_s": sync.bytes_per_s}
    out.update({f"sched/{k}": v for k, v in rollout.counters.items() if v})
    # the trained sequences by class: the advantage they carry (after pair weighting) and their full lengths
    for label, want in (("correct", True), ("incorrect", False)):
        rows = [(float(f[ADVANTAGE][0]), n) for f, n, (gi, ci) in zip(batch.fields, batch.response_lengths,
                                                                         batch.origin)
                if rollout.groups[gi].correct[ci] == want]
        if rows:
            out[f"selected/adv_{label}"] = sum(a for a, _ in rows) / len(rows)
            out[f"selected/length_{label}"] = sum(n for _, n in rows) / len(rows)
    # mean -log p of the sampled tokens under the engine's (temperature-scaled) policy: an entropy proxy
    tokens = sum(len(c.token_ids) for c, _, _ in finished)
    if tokens:
        out["rollout/nll_per_token"] = -sum(float(c.logprobs.sum()) for c, _, _ in finished) / tokens
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
                      cfg.eval.samples, seed=eval_seed(cfg.sampling.seed))
    run.engine.sleep()
    run.metrics.log(step, result, console=False)
    run.metrics.print(f"[eval {label} @ step {step}] pass@1 {result['eval/accuracy']:.3f}  "
                      + (f"mean@{cfg.eval.samples} {result[f'eval/mean@{cfg.eval.samples}']:.3f}  "
                         if cfg.eval.samples else "")
                      + f"length mean {result['eval/response_length/mean']:.1f} "
                        f"median {result['eval/response_length/median']:.0f}")
    return result


def train(cfg: Config) -> int:
    from .platform import phase_sync

    stop = StopRequest()          # first, so a signal during set-up is not fatal (honoured after set-up)
    timer = PhaseTimer(sync=phase_sync())     # CUDA: synchronize at each phase boundary (charges GPU work right)
    run = setup(cfg, stop, timer)
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
            from .plotting import plot_runs
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
