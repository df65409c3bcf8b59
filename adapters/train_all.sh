#!/bin/bash
# Reproduce the shipped demo adapters (recipe in adapters/README.md).
# DEVICE=cuda on a GPU; on CPU the same commands run, only slower (hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-smollm2-135m}
INLAID=${INLAID:-inlaid}
common=(--model "$MODEL" --base-name smollm2-135m --device "$DEVICE" --batch-size 16 --lr 1e-3
        --rank 8 --alpha 16 --max-len 256 --save-every 100 --resume)
for task in arith num2words_en num2words_fr json_extract sort_list code_gen; do
  $INLAID train-adapter --task "$task" --out "adapters/$task" --steps 300 --targets q_proj,v_proj "${common[@]}"
done
# Picking the best and worst row needs more capacity than q/v at 300 steps gave (0.48 vs base 0.58).
$INLAID train-adapter --task table_summary --out adapters/table_summary --steps 800 \
  --targets q_proj,k_proj,v_proj,o_proj "${common[@]}"
$INLAID eval --task all --adapters-root adapters --compare-base --num 200 --device "$DEVICE" --model "$MODEL" \
  --md-out benchmarks/results/adapters.md --json-out benchmarks/results/adapters.json
$INLAID lengths --task all --num 300 --device "$DEVICE" --model "$MODEL"
