#!/usr/bin/env bash
# The project's GPU check on one CUDA machine: installs (make install: .venv with the pinned
# dependencies) unless RLRESTORE_PYTHON names a Python that already has them, then runs
# scripts/gpu_check.py: the converter on a tiny official-layout checkpoint, restore, Stage 1,
# Stage 2 and eval of a tiny model with every role on the GPU in bf16-mixed. It prints
# devices.json, the step times and the peak GPU memory, and writes OUT/gpu_check.json
# (OUT defaults to ./gpu_check). Extra arguments go to gpu_check.py (--device cpu: a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
if [ -z "${RLRESTORE_PYTHON:-}" ]; then
  make install
  RLRESTORE_PYTHON=.venv/bin/python
fi
start=$(date +%s)
"$RLRESTORE_PYTHON" scripts/gpu_check.py --out "${OUT:-gpu_check}" "$@"
echo "gpu check: $(( $(date +%s) - start )) s after installation"
