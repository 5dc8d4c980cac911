#!/usr/bin/env bash
# GPU readiness check for a lent CUDA machine (torch, megatron-core, mbridge, transformers already there; no
# registry). Runs the learner (HF parity, export, train steps, checkpoint save/resume) and the conversion round
# trip on CUDA + NCCL, in a few minutes:
#   bash scripts/gpu_check.sh            # from the repo root; exits non-zero on failure
# NCCL refuses two ranks on one GPU, so multi-rank layouts (TP2, PP2) run only when >= 2 GPUs are visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=4 PYTHONWARNINGS=ignore
WORK=${WORK:-/tmp/gpu_check}; rm -rf "$WORK"; mkdir -p "$WORK"
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
$PY -c "import torch, megatron.core, mbridge, transformers; assert torch.cuda.is_available()" || {
  echo "needs CUDA torch + megatron-core + mbridge + transformers"; exit 2; }
HF=$($PY -c "
import sys; sys.path.insert(0, '.')
from megatron_bppo.testing import make_tiny_checkpoint
print(make_tiny_checkpoint('$WORK/tiny-qwen2', arch='qwen2'))")
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
fail=0
step() { echo "== $1"; shift; "$@" > "$WORK/log.txt" 2>&1 || { tail -40 "$WORK/log.txt"; fail=1; }; }
show() { $PY -c "import json; r=json.load(open('$1')); print({k: r[k] for k in r if k != 'grad_norms'})"; }
step "learner TP1 on CUDA (save at step 1)" $PY tests/workers/learner_worker.py --hf "$HF" --out "$WORK/tp1.json" \
  --save-at 1 --ckpt "$WORK/ckpt" && show "$WORK/tp1.json"
step "learner TP1 resumed from the checkpoint" $PY tests/workers/learner_worker.py --hf "$HF" \
  --out "$WORK/tp1r.json" --resume "$WORK/ckpt/iter_0000001" && show "$WORK/tp1r.json"
if [ "$GPUS" -ge 2 ]; then
  for layout in "2 1" "1 2"; do set -- $layout
    step "learner TP$1 PP$2 over NCCL" $TORCHRUN --nproc-per-node 2 tests/workers/learner_worker.py --hf "$HF" \
      --tp "$1" --pp "$2" --out "$WORK/tp$1pp$2.json" && show "$WORK/tp$1pp$2.json"
  done
fi
step "convert HF -> Megatron -> HF on CUDA" bash -c "$PY tools/convert_checkpoint.py hf-to-mcore --hf-dir $HF \
  --out-dir $WORK/mcore && $PY tools/convert_checkpoint.py mcore-to-hf --ckpt-dir $WORK/mcore --out-dir $WORK/hf2"
$PY - <<PYEOF || fail=1
from safetensors.torch import load_file
a = load_file("$HF/model.safetensors"); b = load_file("$WORK/hf2/model.safetensors")
ok = sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
print("round trip bit-exact:", ok); assert ok
PYEOF
echo "== gpu_check: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
