"""Shared fixtures: tiny HF checkpoints (built once per session) and a torchrun launcher."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_bppo.distributed import free_local_port as free_port, torchrun_command  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process runs of a minute or more (`make test-fast` skips them)")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir):
    from megatron_bppo.testing.tiny_models import make_tiny_checkpoint

    return str(make_tiny_checkpoint(models_dir / "qwen2-untied", arch="qwen2", tie_word_embeddings=False))


@pytest.fixture(scope="session")
def tiny_llama_tied(models_dir):
    from megatron_bppo.testing.tiny_models import make_tiny_checkpoint

    return str(make_tiny_checkpoint(models_dir / "llama-tied", arch="llama", tie_word_embeddings=True))


def load_script(path: str):
    """A script of the repo that is not a package module (bench/, tools/, examples/), imported from its file;
    `path` is relative to the repository root."""
    import importlib.util

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_procs(script_args, nproc: int = 1, timeout: int = 600, env=None, check=True):
    """Run a script under torchrun (nproc > 1) or plain python; OMP_NUM_THREADS=1 per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    if nproc > 1:
        cmd = [*torchrun_command(nproc), *script_args]
    else:
        cmd = [sys.executable, *script_args]
        full_env.setdefault("MASTER_PORT", str(free_port()))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_json(path):
    with open(path) as f:
        return json.load(f)


def wait_for(predicate, proc, timeout=900, poll=0.02) -> bool:
    """Poll `predicate` until it holds (True) or the process `proc` ends (False); AssertionError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s")
