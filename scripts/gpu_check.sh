#!/usr/bin/env bash
# The GPU checks in one command (scripts/gpu_check.py); run from the repository root on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 exec timeout 300 python scripts/gpu_check.py "$@"
