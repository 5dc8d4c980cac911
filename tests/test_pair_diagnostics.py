"""bench/pair_diagnostics.py's length pressure (docs/algorithm.md section 12) on a constructed group, against the
section's closed forms for each update, through the trainer's own batch builder."""
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, load_script
from megatron_bppo.batch import Group, build_update_batch, prefix_rule
from megatron_bppo.config import AlgorithmConfig
from megatron_bppo.rollout.engine import Completion

EOS = 2


@pytest.fixture(scope="module")
def diag():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    return load_script("bench/pair_diagnostics.py")


def completion(i, n, finished=True):
    tokens = [5] * (n - 1) + [EOS if finished else 5]
    return Completion(0, tokens, "", torch.zeros(n), "stop" if finished else "length", i)


def test_pressure_matches_the_closed_forms(diag):
    # one group, p = 1/4: the correct sample is 6 tokens, the wrong ones 4, 10 and 12 (capped, no EOS)
    group = Group("g", [1, 2, 3], "0", [completion(0, 6), completion(1, 4), completion(2, 10),
                                          completion(3, 12, finished=False)], [1.0, 0.0, 0.0, 0.0],
                  [True, False, False, False])
    groups = [group]
    h = diag.stop_hazard(groups, {EOS})
    assert h == pytest.approx(3 / 32)                          # 3 finished samples, 32 tokens
    p, sigma = 0.25, math.sqrt(0.25 * 0.75)
    a_plus, a_minus, c = math.sqrt((1 - p) / p), -math.sqrt(p / (1 - p)), 1 / (2 * sigma)
    L_plus, L_minus = 6, 4                                     # the incorrect member is the shorter one
    expected = {
        "half": h * (a_plus * 3 + a_minus * 2),                # k = ceil(L/2), floor 1, no EOS
        "half_contrast": c * h * (3 - 2),
        "full": a_plus * (h * L_plus - 1) + a_minus * (h * L_minus - 1),
        "full_contrast": c * h * (L_plus - L_minus),
        "pair": (a_plus + a_minus) * h * L_minus + abs(a_minus),   # L- < L+
        "to_correct": a_plus * (h * L_plus - 1) + a_minus * (h * L_minus - 1),   # L- <= L+: as full
    }
    configs = {"half": {}, "half_contrast": {"pair_weighting": "contrast"}, "full": {"prefix": "full"},
               "full_contrast": {"prefix": "full", "pair_weighting": "contrast"}, "pair": {"prefix": "pair"},
               "to_correct": {"prefix": "to_correct"}}
    for name, kw in configs.items():
        algo = AlgorithmConfig(name="bppo", prefix_min_tokens=1, **kw)
        batch = build_update_batch(groups, algo, prefix_rule(algo), step=1)
        # rel: the advantages divide by std + adv_eps (1e-6)
        assert diag.pressure(batch, groups, {EOS}, h) == pytest.approx(expected[name], rel=1e-5), name
    # GRPO: h G sigma (mean correct length - mean wrong length) + the capped samples' advantages
    grpo = AlgorithmConfig(name="grpo")
    batch = build_update_batch(groups, grpo, prefix_rule(grpo), step=1)
    want = h * 4 * sigma * (6 - (4 + 10 + 12) / 3) + a_minus
    assert diag.pressure(batch, groups, {EOS}, h) == pytest.approx(want, rel=1e-5)
    assert diag.grpo_pressure(groups, AlgorithmConfig(name="bppo"), {EOS}, h) == pytest.approx(want, rel=1e-5)


def test_replay_check_refuses_a_different_batch(diag):
    group = Group("g", [1, 2], "0", [completion(0, 6), completion(1, 4)], [1.0, 0.0], [True, False])
    algo = AlgorithmConfig(name="bppo", prefix_min_tokens=1)
    batch = build_update_batch([group], algo, prefix_rule(algo), step=1)
    dump = {"origin": batch.origin, "keep": batch.keep_lengths, "sequences": [s.tolist() for s in batch.sequences],
            "adv": [float(f["adv"][0]) for f in batch.fields]}
    diag.check_replay(batch, dump, 1)
    with pytest.raises(SystemExit, match="does not give the dumped batch"):
        diag.check_replay(batch, dict(dump, keep=[6, 4]), 1)
