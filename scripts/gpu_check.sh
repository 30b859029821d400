#!/usr/bin/env bash
# One short GPU check (issue 18; < 5 min on one H100): gpu tests, inference benchmark (base and
# small: regions/s, TFLOP/s vs a measured bf16 matmul peak), a 50-step pre-training throughput run
# and peak GPU memory, written to one JSON. `--dry-run`: the same on the CPU with tiny sizes (CI).
#   scripts/gpu_check.sh [--dry-run] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"
