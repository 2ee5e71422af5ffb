#!/usr/bin/env bash
# The main job, for now on SYNTHETIC activations with known features (real language-model activations
# arrive with the extraction stage). Trains TopK and Matryoshka SAEs, permutes the TopK SAE by importance,
# fits power laws and evaluates every SAE at every granularity. Re-running resumes finished steps.
set -euo pipefail
RUN=${RUN:-runs/demo}
mkdir -p "$RUN"
echo "progsae demo: SYNTHETIC activations (64-d, 512 true features, power-law frequencies) -> $RUN"
N=1024; K=16; TOKENS=2000000
[ -f "$RUN/acts/manifest.json" ] || progsae synth --out "$RUN/acts" --tokens 1000000 --d-in 64 --features 512 --alpha 1.0
[ -f "$RUN/acts-test/manifest.json" ] || progsae synth --out "$RUN/acts-test" --tokens 100000 --d-in 64 --features 512 \
  --alpha 1.0 --held-out
progsae train "$RUN/acts" --out "$RUN/topk" --d-sae $N --k $K --tokens $TOKENS --dead-tokens 200000
progsae train "$RUN/acts" --out "$RUN/matryoshka" --d-sae $N --k $K --tokens $TOKENS --dead-tokens 200000 \
  --matryoshka $((N / 4)),$((N / 2)),$N
progsae train "$RUN/acts" --out "$RUN/matryoshka-sampled" --d-sae $N --k $K --tokens $TOKENS --dead-tokens 200000 \
  --matryoshka-sampled 8
progsae stats "$RUN/topk" "$RUN/acts" --out "$RUN/topk-stats.safetensors" --tokens 200000
progsae permute "$RUN/topk" --stats "$RUN/topk-stats.safetensors" --by e_z2 --out "$RUN/topk-permuted"
echo; echo "== power laws of the TopK SAE's importance (ranks 1..256)"
progsae powerlaw "$RUN/topk-stats.safetensors" --window 1:256 --plot "$RUN/topk-powerlaw.png" --json "$RUN/topk-powerlaw.json"
for sae in topk topk-permuted matryoshka matryoshka-sampled; do
  echo; echo "== $sae"
  progsae eval "$RUN/$sae" "$RUN/acts-test" --out "$RUN/$sae-eval.json"
done
echo; echo "done: results under $RUN (SAEs in SAELens layout, *-eval.json, topk-powerlaw.png)"
