"""Shared fixtures: tiny HF checkpoints (built once per session) and a torchrun launcher."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_procs(script_args, nproc: int = 1, timeout: int = 600, env=None, check=True):
    """Run a script under torchrun (nproc > 1) or plain python; OMP_NUM_THREADS=1 per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    if nproc > 1:
        cmd = [TORCHRUN, f"--nproc-per-node={nproc}", f"--master-port={free_port()}", *script_args]
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
