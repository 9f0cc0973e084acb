#!/usr/bin/env bash
# Create .venv/ with Python 3.12 and install asura with its research, notebook and dev extras,
# plus any listed in ASURA_EXTRAS (comma-separated, e.g. ASURA_EXTRAS=tpu for libtpu, which CI
# uses). Idempotent: reinstalls only when pyproject.toml or the extras changed since the last
# successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3; do
    if [ -x "$cand" ]; then echo "$cand"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1 && pyenv which python3 >/dev/null 2>&1; then
    p="$(pyenv which python3)"
    if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then echo "$p"; return; fi
  fi
  echo "error: Python 3.12 not found (install it, e.g. 'pyenv install 3.12'); jax>=0.11 needs it" >&2
  exit 1
}

extras="research,notebooks,dev${ASURA_EXTRAS:+,$ASURA_EXTRAS}"
stamp=".venv/.installed-$( (cat pyproject.toml; echo "$extras") | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && .venv/bin/python -c 'import asura.kernels' 2>/dev/null; then
  exit 0
fi
py="$(find_python)"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $py"
  "$py" -m venv .venv
fi
echo "[setup] installing asura[$extras] into .venv (first run takes a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done"
