#!/usr/bin/env bash
# The GPU check: one command, from the repository root, on a bare GPU machine (torch, safetensors,
# einops and numpy installed, nothing else; no network). Runs the GPU correctness checks and the
# benchmark table (Wan2.1-1.3B shape, 832x480, bf16, every bounded preset at 30 s and 60 s, all in
# one process) and writes JSON, a Markdown table and the log under $OUT (default gpu-results/).
# Budget: well under 8 minutes on one H100 (the last stage starts no bench past 7.5). See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
"$PYTHON" tools/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
