#!/usr/bin/env bash
# Check a CUDA machine in one call: the GPU and its driver, bf16 support and bf16 matrix
# products, then the encoder's throughput at the published size in bf16 and fp32, with
# the achieved TFLOP/s against the card's bf16 peak.
#
# Usage, from anywhere, with the package installed:
#   bash benchmarks/gpu_check.sh                 # peak taken from the table below by card name
#   PEAK_BF16_TFLOPS=989 bash benchmarks/gpu_check.sh
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # the interpreter that has the package
#
# Exit status: 0 when every check ran, 2 when PYTHON lacks the package or CUDA is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch, neurpir_nwb" 2>/dev/null; then
    echo "$PYTHON cannot import torch and neurpir_nwb; set PYTHON to the interpreter of the environment that has the package" >&2
    exit 2
fi

echo "== GPU"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    echo "nvidia-smi not found"
fi

echo "== CUDA and bf16"
PEAK=$("$PYTHON" - <<'PY'
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA: a CPU build"
    print(f"CUDA is not available to torch {torch.__version__} ({build}); run on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
    sys.exit(2)

# Dense bf16 peaks in TFLOP/s from the vendors' data sheets (without sparsity).
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}
name = torch.cuda.get_device_name(0)
peak = float(os.environ.get("PEAK_BF16_TFLOPS", "0")) or next((value for key, value in PEAKS.items() if key in name), 0.0)
capability = torch.cuda.get_device_capability(0)
print(f"device: {name}, compute capability {capability[0]}.{capability[1]}, torch {torch.__version__}, CUDA {torch.version.cuda}", file=sys.stderr)
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}", file=sys.stderr)

# bf16 matrix products of 8192 x 8192, timed after a warm-up.
size = 8192
a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
repeats = 20
started = time.perf_counter()
for _ in range(repeats):
    a @ b
torch.cuda.synchronize()
tflops = 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
share = f", {100 * tflops / peak:.0f} % of the {peak:.0f} TFLOP/s peak" if peak else " (peak unknown: set PEAK_BF16_TFLOPS)"
print(f"bf16 matmul {size} x {size}: {tflops:.0f} TFLOP/s{share}", file=sys.stderr)
print(peak)
PY
)

echo "== Encoder throughput, published size, bf16"
"$PYTHON" benchmarks/train_throughput.py --device cuda --precision bf16 --sizes published default --steps 10 --flops --peak-tflops "$PEAK"

echo "== Encoder throughput, published size, fp32"
"$PYTHON" benchmarks/train_throughput.py --device cuda --precision fp32 --sizes published --steps 10 --flops --peak-tflops "$PEAK"
