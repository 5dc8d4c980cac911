"""Training metrics: a jsonl file, TensorBoard, optional Weights & Biases, and a live progress line per step.

    logger = MetricsLogger(run_dir, use_tensorboard=True, enabled=(rank == 0), total_steps=30)
    timer = PhaseTimer()
    for step in range(start, total):
        timer.reset()
        with timer("rollout"): ...
        with timer("update"): ...
        logger.log(step, {**train_metrics, **timer.metrics()})
    logger.close()

Metric names the progress line and megatron_bppo/plotting.py look for (the keys megatron_bppo/trainer.py and
megatron_bppo/evaluation.py write, see :data:`METRIC_ALIASES`): ``reward/mean``, ``accuracy`` (share of correct
rollout samples), ``response_length/mean`` (tokens), ``selected/sequences`` and ``selected/tokens`` (what the
learner trained on), ``rollout/tokens_generated`` and ``rollout/tokens_stopped`` (what the engine produced),
``eval/accuracy`` (held-out pass@1), ``eval/response_length/mean``, and ``time/<phase>`` for
the phases rollout, sync, reward, logprob, update plus ``time/step`` (from :meth:`PhaseTimer.metrics`).

``<run_dir>/metrics.jsonl``: one JSON object per :meth:`MetricsLogger.log` call, ``{"step": n, "timestamp": unix
seconds, <flattened metrics>}``; nested dicts become ``a/b`` keys, tensors/numpy scalars become numbers, NaN and
inf become null. Each line is flushed (``fsync=True`` also syncs it to disk). On resume pass ``resume_step=k``:
lines with step > k (written after the checkpoint the run resumes from) are dropped and TensorBoard purges them
too, so the files read as one uninterrupted run. :func:`read_metrics` skips a torn last line and merges the records of
one step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["METRIC_ALIASES", "PHASES", "MetricsLogger", "PhaseTimer", "find_metric", "flatten_metrics",
           "read_metrics"]

log = logging.getLogger(__name__)

PHASES = ("rollout", "sync", "reward", "logprob", "update")
METRIC_ALIASES: dict[str, tuple[str, ...]] = {       # name -> the record key(s) holding it (first found wins)
    "reward": ("reward/mean",),
    "accuracy": ("accuracy",),
    "response_length": ("response_length/mean",),
    "selected_sequences": ("selected/sequences",),
    "selected_tokens": ("selected/tokens",),
    "eval_accuracy": ("eval/accuracy",),
    "eval_response_length": ("eval/response_length/mean",),
    "step_time": ("time/step",),
    "generated_tokens": ("rollout/tokens_generated",),
    "stopped_tokens": ("rollout/tokens_stopped",),
}


def find_metric(record: dict, name: str) -> Optional[float]:
    """The value of ``name`` (a key of :data:`METRIC_ALIASES`; any other name is looked up as a record key) in
    ``record``, or None when it is missing or not a finite number."""
    for key in METRIC_ALIASES.get(name, (name,)):
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


class PhaseTimer:
    """Wall time per named phase of a step; a phase entered twice accumulates. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs at each phase boundary so GPU work is charged to the right phase. Beside the
    step's wall time, the process's CPU seconds since ``reset()`` (this rank's threads, an in-process engine's
    included): a step that waited on other load on the machine shows a lower CPU / wall ratio than its peers."""

    def __init__(self, sync: Optional[Callable[[], None]] = None, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time):
        self.sync, self.clock, self.cpu_clock = sync, clock, cpu_clock
        self.reset()

    def reset(self) -> None:
        self.times: dict[str, float] = {}
        self._t0 = self.clock()
        self._cpu0 = self.cpu_clock()

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            self.sync()
        start = self.clock()
        try:
            yield self
        finally:
            if self.sync:
                self.sync()
            self.times[name] = self.times.get(name, 0.0) + self.clock() - start

    phase = __call__

    def elapsed(self) -> float:
        return self.clock() - self._t0

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """``{prefix+phase: seconds, ..., prefix+"step": seconds since reset(), prefix+"step_cpu": this process's
        CPU seconds since reset()}``."""
        out = {f"{prefix}{k}": v for k, v in self.times.items()}
        out[f"{prefix}step"] = self.elapsed()
        out[f"{prefix}step_cpu"] = self.cpu_clock() - self._cpu0
        return out


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # torch / numpy scalars
        v = v.item()
    elif hasattr(v, "tolist") and callable(v.tolist):                           # tensors / arrays
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_scalar(x) for x in v]
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        else:
            out[key] = _scalar(v)
    return out


def _auto_enabled() -> bool:
    try:
        import torch.distributed as dist
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except ImportError:
        return True


def _fmt_time(s: float) -> str:
    return f"{s:.1f}s" if s < 100 else f"{s / 60:.1f}m"


def _fmt_count(v: float) -> str:
    return f"{v / 1000:.1f}k" if abs(v) >= 10000 else f"{v:.0f}"


class MetricsLogger:
    def __init__(self, run_dir: Union[str, os.PathLike], use_tensorboard: bool = True, wandb: Any = None, *,
                 enabled: Optional[bool] = None, console: bool = True, fsync: bool = False,
                 resume_step: Optional[int] = None, total_steps: Optional[int] = None,
                 filename: str = "metrics.jsonl"):
        """``wandb``: None/False off; True -> ``wandb.init(project="megatron_bppo", dir=run_dir)``; a dict ->
        ``wandb.init(**dict)``. ``enabled`` None = rank 0 of torch.distributed (or True without it)."""
        self.enabled = _auto_enabled() if enabled is None else bool(enabled)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.console, self.fsync, self.total_steps = console, fsync, total_steps
        self._file = self._tb = self._wandb = self._rich = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
            except ImportError as e:
                log.warning("TensorBoard logging is off (%s); pip install tensorboard to enable it", e)
        if wandb:
            try:
                import wandb as wandb_mod
                kwargs = dict(wandb) if isinstance(wandb, dict) else {"project": "megatron_bppo"}
                kwargs.setdefault("dir", str(self.run_dir))
                self._wandb = wandb_mod.init(**kwargs)
            except Exception as e:  # noqa: BLE001 - not installed, not logged in, offline...
                log.warning("Weights & Biases logging is off (%s: %s)", type(e).__name__, e)
        if console:
            try:
                from rich.console import Console
                self._rich = Console(highlight=False, soft_wrap=True)
            except ImportError:
                self._rich = None

    def truncate_after(self, step: int) -> int:
        """Drop records with step > ``step`` from the jsonl (atomic rewrite); returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    dropped += 1  # a torn line from a killed run
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return dropped

    def log(self, step: int, metrics: dict, *, console: Optional[bool] = None) -> dict:
        """Write one record; returns it (also when disabled, so callers can reuse the flattened dict)."""
        record = {"step": int(step), "timestamp": round(time.time(), 3), **flatten_metrics(metrics)}
        if not self.enabled:
            return record
        if self._file is None:  # logging again after close(): append
            self._file = open(self.path, "a", encoding="utf-8")
        line = json.dumps(record, default=str, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        numeric = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "timestamp")}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self.console if console is None else console:
            self.print(self.progress_line(step, record))
        return record

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.print(text, markup=False)
        else:
            print(text, flush=True)

    def progress_line(self, step: int, record: dict) -> str:
        head = f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")
        parts = [head]
        for name, label, fmt in (("reward", "reward", "{:.3f}"), ("accuracy", "acc", "{:.3f}"),
                                 ("response_length", "len", "{:.0f}"), ("eval_accuracy", "eval_acc", "{:.3f}")):
            v = find_metric(record, name)
            if v is not None:
                parts.append(f"{label} {fmt.format(v)}")
        seqs, toks = find_metric(record, "selected_sequences"), find_metric(record, "selected_tokens")
        if seqs is not None or toks is not None:
            parts.append("sel " + " ".join(x for x in (seqs is not None and f"{seqs:.0f} seq",
                                                       toks is not None and f"{_fmt_count(toks)} tok") if x))
        generated, stopped = find_metric(record, "generated_tokens"), find_metric(record, "stopped_tokens")
        if generated is not None:
            parts.append(f"gen {_fmt_count(generated)} tok" + (f" ({_fmt_count(stopped)} stopped)" if stopped else ""))
        times = {k[5:]: v for k, v in record.items() if k.startswith("time/") and isinstance(v, (int, float))}
        order = [p for p in PHASES if p in times] + sorted(k for k in times
                                                           if k not in PHASES and k not in ("step", "step_cpu"))
        if order:
            parts.append(" ".join(f"{p} {_fmt_time(times[p])}" for p in order))
        if "step" in times:
            parts.append(f"step {_fmt_time(times['step'])}"
                         + (f" (cpu {_fmt_time(times['step_cpu'])})" if "step_cpu" in times else ""))
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: Union[str, os.PathLike], filename: str = "metrics.jsonl") -> list[dict]:
    """Records of a run (a run directory or a jsonl file), one per step in step order: records of the same step
    (e.g. a training record and an eval record) are merged, later keys winning. Records without a step are
    appended in file order. Torn or non-JSON lines are skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.exists():
        raise FileNotFoundError(f"no metrics at {str(p)!r}")
    by_step, other = {}, []
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if isinstance(rec.get("step"), int):
                by_step[rec["step"]] = {**by_step.get(rec["step"], {}), **rec}
            else:
                other.append(rec)
    return [by_step[s] for s in sorted(by_step)] + other
