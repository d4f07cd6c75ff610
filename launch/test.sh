#!/usr/bin/env bash
# Creates/updates the venv (.venv, pip-cache friendly) with the pinned stack + test extras, then runs the suite.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh dev
# tests/test_demo.py drives Debian's Chromium: install it when missing and apt-get may run (root or sudo -n);
# otherwise that test is skipped, naming the missing binary.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  as_root=(); [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    { "${as_root[@]}" apt-get update -qq \
        && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "test.sh: could not install chromium + chromium-driver; the demo's browser test will be skipped" >&2
  fi
fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec .venv/bin/python -m pytest -q tests "$@"
