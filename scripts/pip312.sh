# Sourced by scripts/check_gpu_pins.sh and scripts/build_wheelhouse.sh (expects $PY, a fallback interpreter): sets
# PIP to pip under a Python 3.12 -- $PY312, else python3.12 on PATH or pyenv's -- because pip evaluates environment
# markers (python_version > "3.11") for the interpreter running it, whatever --python-version says; without one it
# falls back to $PY with a warning. Then only PyPI: a site's pip.conf (extra indexes, find-links, a global
# constraint file) must not change the answer (an empty value does not override pip.conf; a blank one does).
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  for c in python3.12 "$HOME/.pyenv/versions/"3.12*/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$(command -v "$c"); break
    fi
  done
fi
if [ -n "$PY312" ]; then PIP=("$PY312" -m pip); echo "pip under $("$PY312" -V) ($PY312)"
else PIP=("$PY" -m pip); echo "WARNING: no Python 3.12 found (set PY312): markers are evaluated for $("$PY" -V)"; fi
export PIP_CONSTRAINT=" " PIP_FIND_LINKS=" " PIP_EXTRA_INDEX_URL=" " PIP_INDEX_URL=https://pypi.org/simple
export PIP_DISABLE_PIP_VERSION_CHECK=1
