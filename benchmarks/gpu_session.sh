#!/usr/bin/env bash
# The GPU figures of the decode and pretraining issues in ONE device call (a lent H100/H200 machine gives a
# session 15 minutes in all, start-up included): lmforge's compiled bf16 decode, lmforge's pretraining
# tokens/s and MFU on both shapes, and the same-call reference (transformers eager/compiled, a minimal
# compiled LLaMA) so that ratios compare like with like; plus where the decode step's time goes (profile) and
# which attention backend is fastest on these shapes (gpu_attention.py).
#
# Prepare here, once per checkout (.devbench/ is git-ignored; ../shared does not travel to the machine):
#     mkdir -p .devbench && cp ../shared/bench/gpu_reference.py .devbench/
# then call the device tool with:  command="bash benchmarks/gpu_session.sh", carry=[".devbench"], timeout_s=590
# (`bash benchmarks/gpu_session.sh quantized`, timeout_s=450: only the quantized decode check, a second call.)
# The machine's image has torch, transformers, tokenizers, safetensors, tensorboard (lmforge runs from the
# tree via PYTHONPATH: nothing to install). Every part's output also lands in $OUT/*.log, which comes back.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/lmforge-gpu}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.log"
if [ "${1:-}" = quantized ]; then  # issue 18's CUDA check alone (~4 min): bf16 against int8 / int4, per shape too
  timeout 420 python3 benchmarks/gpu_decode.py --rounds 3 --quantize int4 int8 --products 2>&1 | tee "$OUT/quantized.log"
  exit 0
fi
timeout 140 python3 benchmarks/gpu_decode.py --profile 64 2>&1 | tee "$OUT/decode.log"
timeout 30 python3 benchmarks/gpu_attention.py 2>&1 | tee "$OUT/attention.log"
timeout 230 python3 benchmarks/gpu_pretrain.py --out "$OUT" 2>&1 | tee "$OUT/pretrain.log"
if [ -f .devbench/gpu_reference.py ]; then
  timeout 180 python3 .devbench/gpu_reference.py --out "$OUT" --budget 170 2>&1 | tee "$OUT/reference.log"
else
  echo "no .devbench/gpu_reference.py: see the top of this script" | tee "$OUT/reference.log"
fi
