"""Real multi-process runs over gloo: HF parity, export round trip, train-step parity across TP/PP/DP layouts,
and a TP1 checkpoint (model + distributed-optimizer state + step) resumed at other layouts."""
import os

import pytest
from safetensors.torch import load_file

from conftest import read_json, run_procs

WORKER = "tests/workers/learner_worker.py"
LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "tp2pp2": (2, 2, 4), "dp2": (1, 1, 2)}


def update_mismatch(weights, ref_weights, init) -> float:
    """Largest per-tensor ||w - w_ref|| / ||w_ref - w_init||: how far a layout's training update strays from the
    reference update. (Element-wise comparison is too strict: Adam divides by sqrt(v), so fp32 reduction-order
    noise in near-zero gradients moves those elements by up to ~lr.)"""
    return max(((weights[k] - ref_weights[k]).norm() / (ref_weights[k] - init[k]).norm().clamp_min(1e-12)).item()
               for k in ref_weights)


@pytest.fixture(scope="module")
def init_weights(tiny_qwen2):
    return load_file(os.path.join(tiny_qwen2, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_qwen2, tmp_path_factory):
    """Reference at TP1 (saves a checkpoint after step 1), then each layout twice: from HF and resumed."""
    work = tmp_path_factory.mktemp("parity")
    ckpt = str(work / "ckpt")
    out = {}
    ref = str(work / "tp1.json")
    run_procs([WORKER, "--hf", tiny_qwen2, "--out", ref, "--save-at", "1", "--ckpt", ckpt, "--ckpt-dp", ckpt + "-dp"])
    out["tp1"] = read_json(ref), load_file(ref + ".final.safetensors")
    for name, (tp, pp, world) in LAYOUTS.items():
        for mode in ("fresh", "resumed"):
            path = str(work / f"{name}-{mode}.json")
            extra = ["--resume", os.path.join(ckpt, "iter_0000001")] if mode == "resumed" else []
            run_procs([WORKER, "--hf", tiny_qwen2, "--tp", str(tp), "--pp", str(pp), "--out", path, *extra],
                      nproc=world)
            out[f"{name}-{mode}"] = read_json(path), load_file(path + ".final.safetensors")
    path = str(work / "dp2-resumed-dp_reshardable.json")            # the default format, resharded over DP only
    run_procs([WORKER, "--hf", tiny_qwen2, "--out", path, "--resume", os.path.join(ckpt + "-dp", "iter_0000001")],
              nproc=2)
    out["dp2-resumed-dp_reshardable"] = read_json(path), load_file(path + ".final.safetensors")
    return out


def test_reference_learns_and_matches_hf(runs):
    result, _ = runs["tp1"]
    assert result["logprob_maxdiff_vs_hf"] < 1e-4
    assert result["export_names_equal"] and result["export_maxdiff"] == 0.0
    losses = result["losses"]
    assert losses[0] > losses[1] > losses[2], losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_hf_and_exports_exactly(runs, layout):
    result, _ = runs[f"{layout}-fresh"]
    assert result["logprob_maxdiff_vs_hf"] < 1e-4, result
    assert result["export_names_equal"], result
    assert result["export_maxdiff"] == 0.0, result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_steps_match_tp1(runs, layout, init_weights):
    ref, ref_weights = runs["tp1"]
    result, weights = runs[f"{layout}-fresh"]
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert result["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    mismatch = update_mismatch(weights, ref_weights, init_weights)
    assert mismatch < 1e-2, f"training update after {len(ref['losses'])} steps strays from TP1's by {mismatch:.2e}"


@pytest.mark.parametrize("layout", [*LAYOUTS, "dp2-resumed-dp_reshardable"])
def test_resharded_resume_equals_uninterrupted(runs, layout, init_weights):
    """Model, Adam moments, Adam step and LR schedule survive a save at TP1 and a load at another layout:
    eval log-probs right after loading and the following steps match the uninterrupted TP1 run."""
    ref, ref_weights = runs["tp1"]
    result, weights = runs[layout if layout.endswith("dp_reshardable") else f"{layout}-resumed"]
    assert result["resumed_step"] == 1
    assert result["eval_logprob_sum_after_load"] == pytest.approx(ref["eval_logprob_sum_at_save"], rel=1e-6)
    assert result["losses"] == pytest.approx(ref["losses"][1:], rel=1e-5, abs=1e-6)
    mismatch = update_mismatch(weights, ref_weights, init_weights)
    assert mismatch < 1e-2, f"final weights stray from the uninterrupted run's by {mismatch:.2e} of the update"


def test_mismatch_metric_detects_a_different_update(runs, init_weights):
    """Guard for the metric itself: one training step fewer is far outside the tolerance used above."""
    _, ref_weights = runs["tp1"]
    halfway = {k: init_weights[k] + (ref_weights[k] - init_weights[k]) * 2 / 3 for k in ref_weights}
    assert update_mismatch(halfway, ref_weights, init_weights) > 0.3


def test_dp_reshardable_refuses_another_tp_or_pp(tmp_path):
    """The default optimizer format loads at the saved TP x PP only: anything else is refused before loading,
    naming the keys and both ways out; legacy checkpoints (no format recorded) are fully_reshardable."""
    from megatron_bppo.checkpointing import check_optimizer_layout
    from megatron_bppo.errors import ConfigError

    meta = {"optimizer_format": "dp_reshardable", "layout": {"tp": 1, "pp": 1}}
    assert check_optimizer_layout("ck", meta, 1, 1) == "dp_reshardable"
    for tp, pp in ((2, 1), (1, 2)):
        with pytest.raises(ConfigError, match=r"parallel.tp=1, parallel.pp=1.*optimizer_format=fully_reshardable"):
            check_optimizer_layout("ck", meta, tp, pp)
    assert check_optimizer_layout("ck", {"layout": {"tp": 1, "pp": 1}}, 4, 2) == "fully_reshardable"
    assert check_optimizer_layout("ck", dict(meta, optimizer_format="fully_reshardable"), 4, 2) == "fully_reshardable"
