#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on a bare GPU machine that has Python 3.12 with torch and transformers and no
# package registry: megatron-core, mbridge, math-verify and what they and megatron_bppo pull in beyond torch and
# transformers (and beyond those two's own requirements, which such a machine has). CPython 3.12, manylinux x86_64.
#
#   bash scripts/build_wheelhouse.sh [DIR]        # default DIR: wheelhouse/ (gitignored); needs PyPI, no GPU
#
# Versions: constraints-gpu.txt where it pins (megatron-core, mbridge, math-verify ...), else what pip resolves for
# them together with torch and transformers at their pins. Also megatron-core at the CPU stack's pin
# (constraints.txt), so that gpu_check.sh can run MCORE_VERSION=<that> without another transfer. Fails when the
# directory is over MAX_MIB (default 60: the device tool carries at most 64 MiB of repository and carried paths).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheelhouse}
MAX_MIB=${MAX_MIB:-60}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}   # needs packaging
# What megatron_bppo imports on gpu_check's path, beyond torch and transformers (rich, tensorboard, matplotlib and
# pyarrow are optional there: tiny_bppo.yaml turns TensorBoard off, plots are skipped without matplotlib, parquet
# is not read).
WANT=(megatron-core mbridge math-verify safetensors einops pyyaml psutil packaging)
PRESENT=(torch transformers)          # on the machine already, with everything they require

source scripts/pip312.sh      # PIP: pip under a Python 3.12, PyPI only
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done

TMP=$(mktemp -d /tmp/wheelhouse.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
echo "== resolving ${WANT[*]} with ${PRESENT[*]} (metadata only)"
"${PIP[@]}" install -q --dry-run --ignore-installed --target "$TMP/unused" "${PLAT[@]}" -c constraints-gpu.txt \
  --report "$TMP/report.json" "${WANT[@]}" "${PRESENT[@]}" > "$TMP/resolve.log" 2>&1 \
  || { tail -20 "$TMP/resolve.log"; exit 1; }
# the wheelhouse: WANT and their requirements, minus PRESENT and everything PRESENT requires
"$PY" - "$TMP/report.json" "${#WANT[@]}" "${WANT[@]}" "${PRESENT[@]}" > "$TMP/list.txt" <<'EOF'
import json, re, sys
from packaging.requirements import Requirement

report = json.load(open(sys.argv[1]))
n = int(sys.argv[2]); want, present = sys.argv[3:3 + n], sys.argv[3 + n:]
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
env = {**report["environment"], "extra": ""}
meta = {canon(i["metadata"]["name"]): i["metadata"] for i in report["install"]}

def closure(roots):
    seen, todo = set(), [canon(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in meta:
            continue
        seen.add(name)
        for line in meta[name].get("requires_dist") or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canon(req.name))
    return seen

keep = (closure(want) - closure(present)) | {canon(w) for w in want}
for name in sorted(keep):
    print(f"{meta[name]['name']}=={meta[name]['version']}")
EOF
MC_CPU=$(sed -n 's/^megatron-core==\([^ #]*\).*/\1/p' constraints.txt)
echo "megatron-core==$MC_CPU" >> "$TMP/list.txt"
echo "== downloading: $(tr '\n' ' ' < "$TMP/list.txt")"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
while read -r req; do
  "${PIP[@]}" download -q --no-deps "${PLAT[@]}" -d "$DIR" "$req" || { echo "download failed: $req"; exit 1; }
done < "$TMP/list.txt"
ls -l "$DIR"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}'
BYTES=$(cat "$DIR"/*.whl | wc -c)
MIB=$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $MIB MiB (limit $MAX_MIB MiB)"
awk -v b="$BYTES" -v m="$MAX_MIB" 'BEGIN { exit !(b <= m * 1048576) }' || { echo "FAIL: over $MAX_MIB MiB"; exit 1; }
