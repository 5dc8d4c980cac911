#!/usr/bin/env bash
# Resolver dry run for the pinned GPU stack (constraints-gpu.txt): do the pins, and everything they pull in, resolve
# together for CPython 3.12 on manylinux x86_64 from binary wheels alone? Needs PyPI, no GPU, installs nothing.
#
#   bash scripts/check_gpu_pins.sh [OUT_DIR]      # default OUT_DIR: a temporary directory (printed)
#
# Steps (each prints one PASS/FAIL line; exit status: the number of FAILs):
#   1. pip install --dry-run --ignore-installed --report for the whole stack: vllm, torch, megatron-core, mbridge,
#      transformers, TransformerEngine (its Python package and cu13 core library), TransformerEngine's torch
#      extension's declared requirements, and megatron_bppo's own install_requires, all under -c constraints-gpu.txt.
#      The resolved set (name==version, ~220 packages) is written to OUT_DIR/resolved.txt.
#   2. transformer-engine-torch: PyPI has an sdist and no wheel; checked by asking for a wheel (expected: none), so
#      that the day one appears this line says so. docker/Dockerfile.gpu compiles it against the pinned torch.
#   3. megatron-core at its pin (a cp312-only wheel, not installable on the Python 3.11 CPU machine): every
#      megatron.core name that megatron_bppo, tools/ and tests/workers/ import must exist in it (scripts/check_mcore_api.py).
# Markers (python_version > "3.11" ...) are evaluated by the interpreter that runs pip, whatever --python-version
# says, so pip runs under a Python 3.12: $PY312, else python3.12 on PATH or pyenv's; without one it falls back to
# this python3 and says that markers were evaluated for its version.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:-$(mktemp -d /tmp/check_gpu_pins.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}   # needs packaging

source scripts/pip312.sh      # PIP: pip under a Python 3.12, PyPI only
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done   # glibc 2.39: Ubuntu 24.04

# transformer-engine-torch 2.20.2's Requires-Dist (its sdist's PKG-INFO): resolved here in its place.
TE_TORCH_REQS=("torch>=2.1" einops onnxscript onnx packaging pydantic nvdlfw-inspect "nvidia-cudnn-frontend>=1.29.0")
# megatron_bppo's install_requires (setup.py CORE) and the GPU extra, minus transformer-engine[pytorch] (above).
CORE=$("$PY" - <<'EOF'
import ast
tree = ast.parse(open("setup.py").read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CORE":
        print(" ".join(ast.literal_eval(node.value)))
EOF
)
PKGS=(vllm torch torchvision torchaudio transformers megatron-core mbridge transformer-engine transformer-engine-cu13
      "${TE_TORCH_REQS[@]}" $CORE sentencepiece)
fails=0
result() { echo "$1 $2"; [ "$1" = PASS ] || fails=$((fails + 1)); }

echo "== 1. resolver dry run (${#PKGS[@]} requirements, -c constraints-gpu.txt)"
start=$(date +%s)
"${PIP[@]}" install --dry-run --ignore-installed --target "$OUT/target-unused" "${PLAT[@]}" -c constraints-gpu.txt \
  --report "$OUT/report.json" "${PKGS[@]}" > "$OUT/resolve.log" 2>&1
rc=$?
if [ $rc = 0 ]; then
  "$PY" - "$OUT" constraints-gpu.txt <<'EOF'
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("stack", "megatron_bppo/platform/stack.py")   # pure: no torch
stack = sys.modules["stack"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stack)
find_mismatches, parse_constraints = stack.find_mismatches, stack.parse_constraints
out, pins_file = sys.argv[1], sys.argv[2]
report = json.load(open(f"{out}/report.json"))
resolved = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}
with open(f"{out}/resolved.txt", "w") as f:
    f.write("".join(f"{n}=={v}\n" for n, v in sorted(resolved.items(), key=lambda kv: kv[0].lower())))
pins = parse_constraints(open(pins_file).read())
pins.pop("transformer-engine-torch", None)          # sdist only: resolved through its requirements (step 2)
env = dict(report["environment"])
bad = find_mismatches(pins, resolved, required=None, environment=env)
for m in bad:
    print("  off pin:", m.message())
key = ("vllm", "torch", "torchvision", "torchaudio", "triton", "nvidia-nccl-cu13", "transformers", "tokenizers",
       "megatron-core", "mbridge", "transformer-engine", "transformer-engine-cu13", "nvidia-cudnn-frontend",
       "flashinfer-python", "math-verify", "numpy", "setuptools")
low = {k.lower().replace("_", "-"): v for k, v in resolved.items()}
print("  " + " ".join(f"{k}=={low[k]}" for k in key if k in low))
print(f"  {len(resolved)} packages resolved for Python {env['python_version']}; full list: {out}/resolved.txt")
sys.exit(1 if bad else 0)
EOF
  [ $? = 0 ] && result PASS "resolver: the pinned stack resolves ($(( $(date +%s) - start )) s)" \
             || result FAIL "resolver: resolved, but off a pin (above)"
else
  grep -E "^ERROR|conflict|requires" "$OUT/resolve.log" | head -20
  result FAIL "resolver: no consistent set (log: $OUT/resolve.log)"
fi

echo "== 2. transformer-engine-torch as a wheel"
TE_VER=$(sed -n 's/^transformer-engine-torch==\([^ #]*\).*/\1/p' constraints-gpu.txt)
if "${PIP[@]}" download --no-deps "${PLAT[@]}" -d "$OUT/te" "transformer-engine-torch==$TE_VER" \
     > "$OUT/te.log" 2>&1; then
  result PASS "transformer-engine-torch $TE_VER: a cp312 wheel exists now: docker/Dockerfile.gpu may install it as is"
else
  grep -q "No matching distribution" "$OUT/te.log" \
    && result PASS "transformer-engine-torch $TE_VER: sdist only on PyPI, as expected: compiled in docker/Dockerfile.gpu" \
    || result FAIL "transformer-engine-torch $TE_VER: pip download failed for another reason ($OUT/te.log)"
fi

echo "== 3. megatron.core names used by megatron_bppo, in the pinned megatron-core"
MC_VER=$(sed -n 's/^megatron-core==\([^ #]*\).*/\1/p' constraints-gpu.txt)
rm -rf "$OUT/mcore" && mkdir -p "$OUT/mcore"
if "${PIP[@]}" download --no-deps "${PLAT[@]}" -d "$OUT/mcore" "megatron-core==$MC_VER" > "$OUT/mcore.log" 2>&1 &&
   "$PY" -c "import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]).extractall(sys.argv[1] + '/x')" "$OUT/mcore"; then
  line=$("$PY" scripts/check_mcore_api.py "$OUT/mcore/x" megatron_bppo tools tests/workers)
  rc=$?
  echo "$line" | sed 's/^/  /'
  [ $rc = 0 ] && result PASS "megatron-core $MC_VER: every megatron.core import of megatron_bppo exists" \
              || result FAIL "megatron-core $MC_VER: missing names (above)"
else
  result FAIL "megatron-core $MC_VER: download failed ($OUT/mcore.log)"
fi

echo "== check_gpu_pins: $([ $fails = 0 ] && echo PASS || echo "FAIL ($fails)")  (output: $OUT)"
exit $fails
