#!/usr/bin/env bash
# Creates/updates the venv (.venv, pip-cache friendly) with the pinned stack + test extras, then runs the suite.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh dev
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec .venv/bin/python -m pytest -q tests "$@"
