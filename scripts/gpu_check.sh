#!/usr/bin/env bash
# GPU check for a bare one-GPU machine: Python 3.12 with torch and transformers, no package registry. Installs what
# else it needs from wheelhouse/ (scripts/build_wheelhouse.sh, built where PyPI is reachable), then runs, on CUDA
# with NCCL, in well under 8 minutes (~3-4 expected on one H100/H200 for the tiny model):
#
#   parity_fp32     HF vs Megatron log-probs in fp32 (max |d logprob|), then 3 train steps, a save after step 1
#   parity_bf16     the same in bf16, against HF in bf16 and in fp32 (max and mean |d logprob|), 1 train step
#   padded_bf16     parity_bf16 on a tied Llama with vocab 600 (padded to 640: in bf16 the learner must find the real
#                   vocabulary through Float16Module) and Llama 3 rope scaling
#   train_step      the fp32 run's losses finite and falling, grad norms finite
#   resume          a new process loads the step-1 checkpoint (model + distributed optimizer + scheduler): eval
#                   log-probs right after loading equal those at the save, and steps 2-3 repeat the losses
#   convert         tools/convert_checkpoint.py HF -> Megatron -> HF, bit-exact
#   trainer         2 steps of `megatron_bppo.cli train` (tiny_bppo.yaml) at world size 1 under torchrun with the
#                   transformers rollout engine (rollout.backend=hf), a checkpoint each step: the StopRequest
#                   all-reduce, the rewards, the learner update and the checkpoint on NCCL
#   trainer_resume  the same run continued to step 3 from its step-2 checkpoint
#   tp2, pp2        only with >= 2 GPUs: tests/workers/learner_worker.py at TP2 and PP2 over NCCL
# One line per check (PASS/FAIL, the key numbers), then a summary; exit status 0 only if every check passed.
#
#   bash scripts/gpu_check.sh                       # from anywhere; logs and JSON under $WORK (/tmp/gpu_check)
# Settings (environment): PY (python3), WORK, WHEELHOUSE (wheelhouse), BUDGET_S (420: overall limit; each check
# gets its own limit or what is left of this, whichever is less), ONLY=parity_fp32,convert (a subset),
# MCORE_VERSION (megatron-core from the wheelhouse; default: constraints-gpu.txt's pin, e.g. 0.16.1 for the CPU
# stack's), GPU_CHECK_CPU=1 (run on CPU + gloo where no GPU is visible: checks this script's logic only).
# Through the device tool: docs/slurm.md, "The pinned GPU stack and the GPU check".
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}
WHEELHOUSE=${WHEELHOUSE:-$REPO/wheelhouse}
BUDGET_S=${BUDGET_S:-420}
ONLY=${ONLY:-}
MCORE_VERSION=${MCORE_VERSION:-$(sed -n 's/^megatron-core==\([^ #]*\).*/\1/p' constraints-gpu.txt)}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
rm -rf "$WORK"; mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# ------------------------------------------------------------------ what is missing, from the wheelhouse
SITE=$WORK/site
NEED=$("$PY" - "$WHEELHOUSE" "$MCORE_VERSION" <<'EOF'
import glob, importlib.metadata as md, os, re, sys
wheelhouse, mcore = sys.argv[1], sys.argv[2]
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
for path in sorted(glob.glob(os.path.join(wheelhouse, "*.whl"))):
    name, version = os.path.basename(path).split("-")[:2]
    name = canon(name)
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if name == "megatron-core":
        if version == mcore and have != mcore:
            print(path)
    elif have is None:
        print(path)
EOF
)
if [ -n "$NEED" ]; then
  echo "== installing from $WHEELHOUSE into $SITE: $(for w in $NEED; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $NEED \
    || { echo "FAIL setup: pip install from $WHEELHOUSE failed"; exit 2; }
fi
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}

"$PY" - <<'EOF' || { echo "FAIL setup: the stack above cannot run the check (build the wheelhouse)"; exit 2; }
import importlib, sys
import torch
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s), NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if cuda else '-'})")
missing = []
for mod in ("megatron.core", "mbridge", "transformers", "safetensors", "math_verify", "transformer_engine", "vllm"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:20s} {getattr(m, '__version__', '?')}  {m.__file__}")
    except Exception as e:
        print(f"  {mod:20s} not importable ({type(e).__name__}: {str(e)[:80]})")
        if mod not in ("transformer_engine", "vllm"):
            missing.append(mod)
from math_verify import parse, verify
assert verify(parse("$\\frac{1}{2}$"), parse("$0.5$")), "math_verify: 1/2 != 0.5"
sys.exit(1 if missing else 0)
EOF
echo "== installed vs constraints-gpu.txt (warnings only; the trainer logs the same at start)"
"$PY" -m megatron_bppo.platform.stack --gpu 2>&1 | sed 's/^/  /'

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" = 0 ] && [ "${GPU_CHECK_CPU:-0}" != 1 ]; then
  echo "FAIL setup: no CUDA device visible (GPU_CHECK_CPU=1 runs the checks on CPU + gloo)"; exit 2
fi
[ "$GPUS" = 0 ] && echo "== GPU_CHECK_CPU=1: CPU + gloo; PASS lines below say nothing about CUDA"

HF=$WORK/tiny-qwen2
PADDED=$WORK/tiny-llama3-vocab600
"$PY" -c "from megatron_bppo.testing.tiny_models import TINY_LLAMA3_ROPE as R, make_tiny_checkpoint as m
m('$HF', arch='qwen2'); m('$PADDED', **R)" > "$WORK/tiny.log" 2>&1 \
  || { tail -20 "$WORK/tiny.log"; echo "FAIL setup: tiny checkpoints"; exit 2; }

# ------------------------------------------------------------------ checks
PASSED=(); FAILED=()
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
verdict() {   # verdict NAME RC LINE
  if [ "$2" = 0 ]; then PASSED+=("$1"); echo "PASS $1: $3"; else FAILED+=("$1"); echo "FAIL $1: $3"; fi
}
# run NAME LIMIT_S CMD...: the command under a time limit, its output in $WORK/NAME.log; sets RC and SECS
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -le 10 ]; then RC=124; SECS=0; echo "(no time left for $name)" > "$WORK/$name.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s)
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$(port) timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  RC=$?; SECS=$(( $(date +%s) - t0 ))
  if [ "$RC" != 0 ]; then
    echo "---- $name: exit $RC after ${SECS}s$([ "$RC" = 124 ] && echo " (time limit ${limit}s)");" \
         "last lines of $WORK/$name.log:"
    tail -25 "$WORK/$name.log" | sed 's/^/   | /'
  fi
}
# judge NAME RC SCRIPT: python SCRIPT prints the key numbers, exits non-zero on a failed criterion
judge() {
  local name=$1 rc=$2 script=$3 line
  if [ "$rc" != 0 ]; then verdict "$name" 1 "exit $rc after ${SECS}s (log: $WORK/$name.log)"; return; fi
  line=$(WORK=$WORK "$PY" -c "$script" 2>&1); verdict "$name" $? "$line (${SECS}s)"
}
J='import json, math, os; W = os.environ["WORK"]; load = lambda n: json.load(open(f"{W}/{n}.json"))'

FP32_RC=skip
if wanted parity_fp32 || wanted train_step || wanted resume; then
  run parity_fp32 150 "$PY" scripts/gpu_check_worker.py --hf "$HF" --dtype float32 --out "$WORK/fp32.json" \
    --steps 3 --save-at 1 --ckpt "$WORK/ckpt"
  FP32_RC=$RC; FP32_SECS=$SECS
fi
if wanted parity_fp32; then
  judge parity_fp32 "$FP32_RC" "$J
r = load('fp32'); mx, mean = r['logprob_vs_hf_fp32']
print(f'max |d logprob| {mx:.2e} (mean {mean:.1e}) vs HF fp32 on {r[\"device\"]} {r[\"gpu\"] or \"\"}; '
      f'TE spec {r[\"transformer_engine_spec\"]}; optimizer {\"/\".join(r[\"optimizer\"])}')
assert mx < 1e-3, 'over 1e-3'"
fi
if wanted parity_bf16; then
  run parity_bf16 120 "$PY" scripts/gpu_check_worker.py --hf "$HF" --dtype bfloat16 --out "$WORK/bf16.json" --steps 1
  judge parity_bf16 "$RC" "$J
r = load('bf16'); (m16, a16), (m32, a32) = r['logprob_vs_hf_bf16'], r['logprob_vs_hf_fp32']
print(f'max |d logprob| {m16:.3f} (mean {a16:.4f}) vs HF bf16, {m32:.3f} (mean {a32:.4f}) vs HF fp32; '
      f'bf16 step loss {r[\"losses\"][0]:.4f}')
assert m16 < 0.1 and m32 < 0.1 and a16 < 0.02 and a32 < 0.02, 'over 0.1 max / 0.02 mean'
assert all(math.isfinite(x) for x in r['losses'] + r['grad_norms']), 'non-finite loss or grad norm'"
fi
if wanted padded_bf16; then
  run padded_bf16 120 "$PY" scripts/gpu_check_worker.py --hf "$PADDED" --dtype bfloat16 --out "$WORK/padded.json" \
    --steps 1
  judge padded_bf16 "$RC" "$J
r = load('padded'); (m16, a16), (m32, a32) = r['logprob_vs_hf_bf16'], r['logprob_vs_hf_fp32']
print(f'vocab 600 padded to 640, llama3 rope: max |d logprob| {m16:.3f} (mean {a16:.4f}) vs HF bf16, '
      f'{m32:.3f} (mean {a32:.4f}) vs HF fp32')
assert m16 < 0.1 and m32 < 0.1 and a16 < 0.02 and a32 < 0.02, 'over 0.1 max / 0.02 mean'"
fi
if wanted train_step; then
  SECS=${FP32_SECS:-0}
  judge train_step "$FP32_RC" "$J
r = load('fp32'); l, g = r['losses'], r['grad_norms']
print('losses ' + ' '.join(f'{x:.4f}' for x in l) + ', grad norms ' + ' '.join(f'{x:.3f}' for x in g)
      + f', save {r.get(\"save_s\")} s, peak {r.get(\"max_memory_gib\")} GiB')
assert all(math.isfinite(x) for x in l + g), 'non-finite'
assert l[0] > l[1] > l[2], 'loss does not fall on a fixed batch'"
fi
if wanted resume; then
  if [ "$FP32_RC" = 0 ]; then
    run resume 120 "$PY" scripts/gpu_check_worker.py --hf "$HF" --dtype float32 --out "$WORK/resume.json" \
      --steps 3 --resume "$WORK/ckpt/iter_0000001"
  else RC=$FP32_RC; SECS=0; fi
  judge resume "$RC" "$J
a, b = load('fp32'), load('resume')
d_eval = abs(b['eval_logprob_sum_after_load'] - a['eval_logprob_sum_at_save']) / abs(a['eval_logprob_sum_at_save'])
d_loss = max(abs(x - y) / abs(y) for x, y in zip(b['losses'], a['losses'][1:]))
print(f'resumed at step {b[\"resumed_step\"]}: eval log-prob sum rel. diff {d_eval:.1e}, steps 2-3 loss rel. diff '
      f'{d_loss:.1e} ({\"/\".join(b[\"optimizer\"])})')
assert b['resumed_step'] == 1 and len(b['losses']) == 2, 'wrong step'
assert d_eval < 1e-5 and d_loss < 1e-3, 'resumed run differs from the uninterrupted one'"
fi
if wanted convert; then
  run convert 150 bash -c "'$PY' tools/convert_checkpoint.py hf-to-mcore --hf-dir '$HF' --out-dir '$WORK/mcore' && \
    '$PY' tools/convert_checkpoint.py mcore-to-hf --ckpt-dir '$WORK/mcore' --out-dir '$WORK/hf2'"
  judge convert "$RC" "
import os
from safetensors.torch import load_file
W = os.environ['WORK']
a, b = load_file(W + '/tiny-qwen2/model.safetensors'), load_file(W + '/hf2/model.safetensors')
same = sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
print(f'HF -> Megatron -> HF: {len(a)} tensors, bit-exact {same}')
assert same"
fi
TRAIN=("$PY" -m torch.distributed.run --nproc-per-node 1 --master-port=PORT -m megatron_bppo.cli train
       --config examples/configs/tiny_bppo.yaml "model.path=$HF" rollout.backend=hf "run_dir=$WORK/run"
       "checkpoint.dir=$WORK/run/ckpt" checkpoint.save_interval=1 train.tensorboard=false train.export_hf=false
       reward.name=megatron_bppo.testing.rewards:even_length)
TRAINER_J="$J
import sys
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
recs = [json.loads(x) for x in open(f'{W}/run/metrics.jsonl') if x.strip()]
done = {r['step']: r for r in recs if 'step' in r and ('loss' in r or 'skipped/no_update_set' in r)}
got = sorted(done)
def fmt(r):
    loss = r.get('loss'); t = r.get('time/step')
    return f'step {r[\"step\"]} loss ' + ('skipped' if loss is None else f'{loss:.4f}') + (f' {t:.1f}s' if t else '')
print('; '.join(fmt(done[s]) for s in got) + f'; checkpoints {sorted(os.listdir(W + \"/run/ckpt\"))}')
assert got[-1:] == [steps], f'last step {got[-1:]} != {steps}'
assert any('loss' in done[s] and math.isfinite(done[s]['loss']) for s in got), 'no update made'
assert os.path.isdir(f'{W}/run/ckpt/iter_{steps:07d}'), 'no checkpoint of the last step'"
if wanted trainer || wanted trainer_resume; then
  run trainer 180 "${TRAIN[@]/#--master-port=PORT/--master-port=$(port)}" train.steps=2
  TRAINER_RC=$RC
  wanted trainer && judge trainer "$RC" "$TRAINER_J"
fi
if wanted trainer_resume; then
  if [ "$TRAINER_RC" = 0 ]; then
    run trainer_resume 150 "${TRAIN[@]/#--master-port=PORT/--master-port=$(port)}" train.steps=3
  else RC=$TRAINER_RC; SECS=0; fi
  # the script's argv: python -c SCRIPT 3
  if [ "$RC" = 0 ] && ! grep -q "resumed from .*iter_0000002 at step 2" "$WORK/trainer_resume.log"; then
    verdict trainer_resume 1 "exit 0 but no 'resumed from ...iter_0000002 at step 2' in $WORK/trainer_resume.log"
  elif [ "$RC" = 0 ]; then
    line=$(WORK=$WORK "$PY" -c "$TRAINER_J" 3 2>&1); verdict trainer_resume $? "resumed from step 2: $line (${SECS}s)"
  else verdict trainer_resume 1 "exit $RC after ${SECS}s (log: $WORK/trainer_resume.log)"; fi
fi
if [ "$GPUS" -ge 2 ]; then
  for layout in "tp2 2 1" "pp2 1 2"; do set -- $layout
    wanted "$1" || continue
    run "$1" 150 "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "$(port)" \
      tests/workers/learner_worker.py --hf "$HF" --tp "$2" --pp "$3" --out "$WORK/$1.json"
    judge "$1" "$RC" "$J
r = load('$1')
print(f'max |d logprob| {r[\"logprob_maxdiff_vs_hf\"]:.2e} vs HF, export max diff {r[\"export_maxdiff\"]}')
assert r['logprob_maxdiff_vs_hf'] < 1e-3 and r['export_maxdiff'] == 0.0"
  done
fi

TOTAL=$(( $(date +%s) - START ))
if [ ${#FAILED[@]} = 0 ] && [ ${#PASSED[@]} -gt 0 ]; then
  echo "== gpu_check: PASS (${#PASSED[@]} checks: ${PASSED[*]}) in ${TOTAL}s"; exit 0
fi
echo "== gpu_check: FAIL (${#FAILED[@]} of $(( ${#PASSED[@]} + ${#FAILED[@]} )) failed: ${FAILED[*]:-none run}) in ${TOTAL}s"
exit 1
