#!/usr/bin/env bash
# Kill pytest with SIGKILL at random moments of --repro-regen, REPRO_KILLS times (default 60; half of the
# kills aimed at the ~ms while the reference is written), and count old/new/corrupt/missing references after each.
set -euo pipefail
cd "$(dirname "$0")/.."
REPRO_KILLS="${REPRO_KILLS:-60}" python -m pytest tests/test_concurrency.py -k sigkill -s -q -p no:cacheprovider
