"""The CPU workarounds: each one is still needed (leaving it out breaks a real megatron-core path with the
error it documents) and still sufficient (with all of them the paths run; see also test_learner_parity)."""
import pytest

from conftest import run_procs
from megatron_bppo.platform import cpu_compat

PROBE = "tests/workers/platform_probe.py"
CUDA = "Torch not compiled with CUDA enabled"
# workaround -> (probe, world size, text expected in the failure, file expected in the traceback)
NEEDED = {
    "current_device": ("train", 1, CUDA, "param_and_grad_buffer.py"),
    "tensor_type": ("train", 1, "torch.cuda.FloatTensor", "distrib_optimizer.py"),
    "cuda_rng": ("train", 1, CUDA, "random.py"),
    "device_literals": ("train", 1, CUDA, "megatron/core"),
    "synchronize": ("pp", 2, CUDA, "p2p_communication.py"),
    "tensor_cuda": ("ckpt", 1, CUDA, "distrib_optimizer.py"),
    "distopt_load_states": ("ckpt", 1, "KeyError: 'step'", "distrib_optimizer.py"),
    "distopt_step_copy": ("ckpt", 1, "PROBE FAILED: Adam step", "expected 2"),
}


def test_every_workaround_has_a_probe_and_documentation():
    names = [w.name for w in cpu_compat.WORKAROUNDS]
    assert sorted(names) == sorted(NEEDED)
    for w in cpu_compat.WORKAROUNDS:
        assert w.where and w.why and ".py" in w.where, w.name


@pytest.mark.parametrize("probe,world", [("train", 1), ("ckpt", 1), ("pp", 2)])
def test_probes_pass_with_all_workarounds(tiny_qwen2, probe, world):
    out = run_procs([PROBE, tiny_qwen2, probe], nproc=world)
    assert "PROBE OK" in out.stdout


@pytest.mark.parametrize("name", list(NEEDED))
def test_workaround_is_still_needed(tiny_qwen2, name):
    probe, world, message, where = NEEDED[name]
    out = run_procs([PROBE, tiny_qwen2, probe], nproc=world, env={"MEGATRON_BPPO_CPU_SKIP": name}, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "PROBE OK" not in out.stdout, \
        f"megatron-core no longer needs the {name!r} workaround: remove it from platform/cpu_compat.py"
    assert message in text and where in text, text[-3000:]


def test_unknown_skip_name_is_rejected(monkeypatch):
    monkeypatch.setenv("MEGATRON_BPPO_CPU_SKIP", "no_such_workaround")
    monkeypatch.setattr(cpu_compat, "_APPLIED", [])
    monkeypatch.setattr(cpu_compat.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown workarounds"):
        cpu_compat.apply()
