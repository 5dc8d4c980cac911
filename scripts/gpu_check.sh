#!/usr/bin/env bash
# GPU readiness check for a lent CUDA machine (torch already installed there, no package registry).
# Runs the learner parity (TP2/PP2/DP2 over NCCL) and conversion tests on CUDA, in well under 8 minutes.
#   bash scripts/gpu_check.sh            # from the repo root; prints a summary, exits non-zero on failure
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export OMP_NUM_THREADS=4 PYTHONWARNINGS=ignore
echo "== devices"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PYEOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
for mod in ("megatron.core", "transformer_engine", "apex", "mbridge", "vllm", "transformers", "safetensors"):
    try:
        m = importlib.import_module(mod); print(f"{mod:20s}", getattr(m, "__version__", "?"))
    except Exception as e:
        print(f"{mod:20s} MISSING ({type(e).__name__})")
PYEOF
missing=$($PY -c "import megatron.core, mbridge, transformers, pytest" 2>&1 | tail -1)
if [ -n "$missing" ]; then echo "missing packages ($missing): carry a wheelhouse or use a container with them"; exit 2; fi
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "== learner + conversion tests on CUDA ($GPUS GPU(s))"
# With one GPU, the multi-rank layouts share it (NCCL allows several ranks per device only through
# separate processes on the same GPU; megatron_bppo.platform maps LOCAL_RANK % device_count).
timeout 420 $PY -m pytest -q -x tests/test_learner_parity.py tests/test_convert.py tests/test_config_and_layout.py \
  -k "not vllm" -p no:cacheprovider 2>&1 | tail -25
rc=${PIPESTATUS[0]}
echo "== gpu_check exit $rc"
exit $rc
