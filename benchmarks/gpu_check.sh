#!/usr/bin/env bash
# The GPU check of issue 18 (benchmarks/gpu_check.py says what it runs): `name: value` lines for the CUDA
# tests, loracl vs Trainer + PEFT tokens/s in bf16, peak GPU memory per method for T = 1..15 tasks and the
# Standard order1 at full size for slao, seq_lora, inflora and mtl; under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                          # on the GPU
#   benchmarks/gpu_check.sh --device cpu --quick     # the same code paths on the CPU, tiny sizes
#   benchmarks/gpu_check.sh --parts bench --output "$OUT/gpu-check"   # one part, logs kept there
#
# Exit status: 0 all parts passed, 1 a part failed (its `<part>_error:` line says why), 2 bad options or no
# CUDA. The Python is $PYTHON, else the checkout's .venv, else python3.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
