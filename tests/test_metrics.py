"""MetricsLogger (jsonl, TensorBoard, W&B hook, progress line, resume truncation), PhaseTimer, and
tools/plot_metrics.py drawing PNGs."""
import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from megatron_bppo.metrics import MetricsLogger, PhaseTimer, flatten_metrics, read_metrics
from megatron_bppo.plotting import cumulative_minutes
from conftest import load_script



def _plot_tool():
    return load_script("tools/plot_metrics.py")


def _lines(path):
    return [json.loads(x) for x in open(path)]


def test_phase_timer_values():
    ticks = iter([100.0, 101.0, 103.0, 103.5, 104.0, 110.0, 200.0])
    synced = []
    cpu = iter([5.0, 12.5, 13.0])
    t = PhaseTimer(sync=lambda: synced.append(1), clock=lambda: next(ticks), cpu_clock=lambda: next(cpu))  # t0 = 100
    with t("rollout"):                                  # 101 -> 103
        pass
    with t.phase("rollout"):                            # 103.5 -> 104: accumulates
        pass
    assert t.metrics() == {"time/rollout": 2.5, "time/step": 10.0, "time/step_cpu": 7.5}
    assert len(synced) == 4                             # at each phase boundary
    t.reset()
    assert t.times == {}


def test_flatten_metrics():
    out = flatten_metrics({"a": {"b": torch.tensor(1.5), "c": np.float32(2.0)}, "ok": True, "bad": float("nan"),
                           "n": np.int64(3), "s": "x", "hist": torch.tensor([1.0, float("inf")]), "l": [1, 2.5]})
    assert out == {"a/b": 1.5, "a/c": 2.0, "ok": 1, "bad": None, "n": 3, "s": "x", "hist": [1.0, None],
                   "l": [1, 2.5]}


def test_logger_writes_jsonl_tensorboard_and_progress(tmp_path, capsys):
    run = tmp_path / "run"
    with MetricsLogger(run, total_steps=3) as ml:
        rec = ml.log(1, {"reward": {"mean": 0.5}, "accuracy": 0.25, "response_length/mean": 57.4,
                         "selected/sequences": 32, "selected/tokens": 12345, "time/rollout": 30.12,
                         "time/sync": 2.0, "time/update": 18.0, "time/reward": 0.1, "time/logprob": 4.0,
                         "time/step": 130.0, "time/step_cpu": 120.0, "loss": torch.tensor(0.75)})
        ml.log(2, {"eval": {"accuracy": 0.5}})
    assert rec["step"] == 1 and rec["reward/mean"] == 0.5 and rec["loss"] == 0.75
    lines = _lines(run / "metrics.jsonl")
    assert [x["step"] for x in lines] == [1, 2] and all(isinstance(x["timestamp"], float) for x in lines)
    assert {k: v for k, v in lines[0].items() if k != "timestamp"} == {k: v for k, v in rec.items()
                                                                       if k != "timestamp"}
    assert lines[1]["eval/accuracy"] == 0.5
    tb = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert tb and tb[0].stat().st_size > 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("step 1/3 | reward 0.500 | acc 0.250 | len 57 | sel 32 seq 12.3k tok | rollout 30.1s sync 2.0s "
                      "reward 0.1s logprob 4.0s update 18.0s | step 2.2m (cpu 2.0m)")
    assert out[1] == "step 2/3 | eval_acc 0.500"


def test_logger_disabled_writes_nothing(tmp_path, capsys):
    ml = MetricsLogger(tmp_path / "r1", enabled=False)
    assert ml.log(0, {"x": 1})["x"] == 1
    ml.close()
    assert not (tmp_path / "r1").exists() and capsys.readouterr().out == ""


def test_logger_without_tensorboard_or_wandb(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    with caplog.at_level(logging.WARNING, logger="megatron_bppo.metrics"):
        ml = MetricsLogger(tmp_path / "r", wandb=True, console=False)
        ml.log(0, {"x": 1.0})
        ml.log(1, {"x": 2.0})
        ml.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("TensorBoard logging is off" in m for m in msgs) == 1
    assert sum("Weights & Biases logging is off" in m for m in msgs) == 1
    ml.log(2, {"x": 3.0})                                   # after close(): appends again
    ml.close()
    assert [x["x"] for x in _lines(tmp_path / "r" / "metrics.jsonl")] == [1.0, 2.0, 3.0]
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_logger_wandb_hook(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    ml = MetricsLogger(tmp_path / "r", use_tensorboard=False, console=False, wandb={"project": "p", "name": "n"})
    ml.log(3, {"acc": 0.5, "note": "text"})
    ml.close()
    assert calls == [("init", {"project": "p", "name": "n", "dir": str(tmp_path / "r")}),
                     ("log", {"acc": 0.5}, 3), ("finish",)]


def test_resume_truncates_later_steps_and_read_tolerates_torn_lines(tmp_path):
    run = tmp_path / "r"
    ml = MetricsLogger(run, use_tensorboard=False, console=False)
    for s in range(5):
        ml.log(s, {"x": float(s)})
    ml.close()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x": ')                      # a run killed mid-write
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]
    ml = MetricsLogger(run, use_tensorboard=False, console=False, resume_step=2)
    ml.log(3, {"x": 30.0})
    ml.log(3, {"eval/accuracy": 0.5})                      # same step: merged on read
    ml.close()
    recs = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in recs] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert recs[3]["eval/accuracy"] == 0.5
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "none")


def _fake_run(path, n, acc0, len0, step_time):
    ml = MetricsLogger(path, use_tensorboard=False, console=False)
    for s in range(n):
        ml.log(s, {"accuracy": acc0 + 0.02 * s, "response_length/mean": len0 - s, "time/step": step_time,
                   "time/rollout": step_time / 2})
        if s % 2 == 0:
            ml.log(s, {"eval/accuracy": acc0 + 0.03 * s, "eval/response_length/mean": len0 - 2 * s})
    ml.close()
    return path


def test_plot_metrics_pngs(tmp_path, capsys):
    tool = _plot_tool()
    grpo = _fake_run(tmp_path / "grpo", 6, 0.4, 60, 120.0)
    bppo = _fake_run(tmp_path / "bppo", 6, 0.45, 50, 60.0)
    x, y = cumulative_minutes(read_metrics(bppo))
    assert x == [0, 1, 2, 3, 4, 5] and y == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    paths = tool.plot_runs([grpo, bppo / "metrics.jsonl"], ["GRPO", "BPPO"], tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "accuracy_vs_time.png", "response_length.png", "summary.png",
                     "time_per_step.png", "wall_time.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert tool.main([str(grpo), "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 6
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "no metrics at" in capsys.readouterr().err


def test_plot_metrics_skips_missing_metric(tmp_path, capsys):
    tool = _plot_tool()
    ml = MetricsLogger(tmp_path / "r", use_tensorboard=False, console=False)
    for s in range(3):
        ml.log(s, {"accuracy": 0.1 * s})
    ml.close()
    paths = tool.plot_runs([tmp_path / "r"], None, tmp_path / "p")
    assert sorted(p.name for p in paths) == ["accuracy.png", "accuracy_vs_time.png", "summary.png", "wall_time.png"]
    assert "no data for response_length" in capsys.readouterr().err


def test_cumulative_time_puts_initial_eval_at_zero(tmp_path):
    ml = MetricsLogger(tmp_path / "r", use_tensorboard=False, console=False)
    ml.log(0, {"eval/accuracy": 0.3})                      # before training: no time/step
    ml.log(1, {"accuracy": 0.4, "time/step": 30.0})
    ml.log(2, {"accuracy": 0.5, "time/step": 90.0})
    ml.log(2, {"eval/accuracy": 0.6})
    ml.close()
    assert cumulative_minutes(read_metrics(tmp_path / "r")) == ([0.0, 1.0, 2.0], [0.0, 0.5, 2.0])
