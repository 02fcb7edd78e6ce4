#!/usr/bin/env bash
# Create benchmarks/.peer-venv holding the peer library, transfusion-pytorch==0.20.0 (PyPI).
#
# The peer has the same import name as our library (`transfusion_pytorch`), so it lives in a
# virtual environment of its own and the driver (benchmarks/run.py) runs it in a subprocess.
# torch is pinned to 2.13.0 and installed FIRST: that version resolves to a CPU build from the
# local wheel cache, while an unpinned torch would pull a multi-GB CUDA build.
# Idempotent: re-running only checks that the peer imports. The checks run with -P, so a run
# from the repo root sees the venv's package, not ours in the current directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-$HERE/.peer-venv}"
TORCH_VERSION="${PEER_TORCH_VERSION:-2.13.0}"
PEER_VERSION="0.20.0"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi

if ! "$PY" -P -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('transfusion-pytorch') == '$PEER_VERSION' else 1)" 2>/dev/null; then
    # torch stays pinned so pip never replaces the CPU build with a CUDA one
    "$PY" -m pip install --quiet "transfusion-pytorch==$PEER_VERSION" "torch==$TORCH_VERSION"
fi

"$PY" -P -c "import torch, transfusion_pytorch, importlib.metadata as m; print('peer venv ok:', '$VENV', 'torch', torch.__version__, 'transfusion-pytorch', m.version('transfusion-pytorch'))"
