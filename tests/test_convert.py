"""tools/convert_checkpoint.py end to end: HF -> Megatron (one layout) -> HF (another layout) is bit-exact,
the result loads in transformers and in vLLM, and bad inputs fail fast with a message."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_procs
from megatron_bppo.run_lock import LOCK

TOOL = "tools/convert_checkpoint.py"


def hf_tensors(path):
    return {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(path, f)).items()}


def round_trip(hf_dir, work, to_layout, back_layout):
    mcore, out = str(work / "mcore"), str(work / "hf-out")
    tp, pp = to_layout
    run_procs([TOOL, "hf-to-mcore", "--hf-dir", hf_dir, "--out-dir", mcore, "--tp", str(tp), "--pp", str(pp)],
              nproc=tp * pp)
    tp, pp = back_layout
    proc = run_procs([TOOL, "mcore-to-hf", "--ckpt-dir", mcore, "--out-dir", out, "--tp", str(tp), "--pp", str(pp)],
                     nproc=tp * pp)
    assert "[convert] wrote" in proc.stdout
    return mcore, out


@pytest.fixture(scope="module")
def untied_round_trip(tiny_qwen2, tmp_path_factory):
    return round_trip(tiny_qwen2, tmp_path_factory.mktemp("untied"), (2, 1), (1, 2))


@pytest.mark.parametrize("case", ["untied_qwen2_tp2_to_pp2", "tied_llama_pp2_to_tp2"])
def test_round_trip_is_bit_exact(case, request, tiny_qwen2, tiny_llama_tied, tmp_path):
    if case.startswith("untied"):
        src, (_, out) = tiny_qwen2, request.getfixturevalue("untied_round_trip")
    else:
        src, (_, out) = tiny_llama_tied, round_trip(tiny_llama_tied, tmp_path, (1, 2), (2, 1))
    original, converted = hf_tensors(src), hf_tensors(out)
    assert sorted(original) == sorted(converted)
    for name in original:
        assert original[name].dtype == converted[name].dtype and torch.equal(original[name], converted[name]), name
    assert ("lm_head.weight" in converted) == case.startswith("untied")
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, side)), side


def test_converted_dir_loads_in_transformers(untied_round_trip, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = untied_round_trip
    ids = torch.tensor([[1, 5, 9, 100, 200, 300]])
    a = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)
    assert AutoTokenizer.from_pretrained(out).decode([40, 41]) == AutoTokenizer.from_pretrained(tiny_qwen2).decode([40, 41])


def test_converted_dir_loads_in_vllm(untied_round_trip):
    _, out = untied_round_trip
    proc = run_procs(["tests/workers/vllm_greedy.py", out], timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["vllm"] == result["hf"]


def test_bad_inputs_fail_fast(tmp_path, untied_round_trip):
    proc = run_procs([TOOL, "mcore-to-hf", "--ckpt-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "is not a complete megatron_bppo checkpoint" in proc.stderr
    proc = run_procs([TOOL, "hf-to-mcore", "--hf-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")],
                     check=False)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    mcore, hf_out = untied_round_trip
    proc = run_procs([TOOL, "mcore-to-hf", "--ckpt-dir", mcore, "--out-dir", str(tmp_path / "o"), "--tp", "2"],
                     check=False)
    assert proc.returncode == 2 and "run under `torchrun --nproc-per-node 2`" in proc.stderr
    assert not os.path.exists(os.path.join(mcore, LOCK))         # the conversion's lock went with it
    proc = run_procs([TOOL, "hf-to-mcore", "--hf-dir", hf_out, "--out-dir", mcore], check=False)   # a checkpoint root
    assert proc.returncode == 2 and f"--out-dir {mcore!r} already holds checkpoints (iter_0000000)" in proc.stderr
    assert sorted(os.listdir(mcore)) == ["iter_0000000", "latest"]


def test_tampered_checkpoint_is_refused(untied_round_trip, tmp_path):
    import pickle
    import shutil

    mcore, _ = untied_round_trip
    evil = tmp_path / "evil"
    shutil.copytree(os.path.join(mcore, "iter_0000000"), evil)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    with open(evil / ".metadata", "wb") as f:
        pickle.dump(Payload(), f)
    proc = run_procs([TOOL, "mcore-to-hf", "--ckpt-dir", str(evil), "--out-dir", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr
    assert not (tmp_path / "PWNED").exists()
