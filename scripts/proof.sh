#!/usr/bin/env bash
# The proof of docs/proof.md: the real CLI on the shapes world, main result, controls and sweep.
# Usage: scripts/proof.sh [OUT]   (default proof-output/; about 30 minutes on 2 CPU cores)
# INPO may name the command (default: inpo).
set -euo pipefail
OUT=${1:-proof-output}
INPO=${INPO:-inpo}
PAIRS=${PAIRS:-50}          # pairs per training prompt (12 prompts)
SEEDS=${SEEDS:-40}          # seeds per held-out prompt (6 prompts)
BETA=${BETA:-2000}
LR=${LR:-3e-5}
STEPS=${STEPS:-100}
TRAIN="--lr $LR --batch-size 16 --grad-accum 1 --warmup 10 --prompt-dropout 0.1 --num-workers 0 --keep-checkpoints 8"
INVERT="--timesteps-per-pair 2 --batch-size 64 --rows-per-shard 128 --shards-per-window 4"

# 1. preference data: the base model's own pairs, labelled by the reward, shuffled, reversed
$INPO world data --out "$OUT/data" --pairs-per-prompt "$PAIRS" --labeling reward --labeling shuffled --labeling reversed

# 2. stage one: one store per labelling (the inpo recipe: exact timesteps), and one with the authors' recipe
for labels in reward shuffled reversed; do
  $INPO invert --model worlds/shapes --data "$OUT/data/$labels.parquet" --out "$OUT/$labels-exact.zarr" $INVERT --recipe inpo
done
$INPO invert --model worlds/shapes --data "$OUT/data/reward.parquet" --out "$OUT/reward-authors.zarr" $INVERT --recipe authors

# 3. stage two: main result and controls at the chosen defaults
for labels in reward shuffled reversed; do
  $INPO train --cache "$OUT/$labels-exact.zarr" --out "$OUT/runs/$labels" --beta "$BETA" --steps "$STEPS" $TRAIN --checkpoint-every 25
done
$INPO world eval --eval-seeds "$SEEDS" --run "reward=$OUT/runs/reward" --run "shuffled=$OUT/runs/shuffled" \
  --run "reversed=$OUT/runs/reversed" --json "$OUT/main.json" --grid "$OUT/grid.png" --plot "$OUT/rewards.png"

# 4. sweep: β × steps (checkpoints of one run per β), and timestep mode
for beta in 500 5000; do
  $INPO train --cache "$OUT/reward-exact.zarr" --out "$OUT/runs/beta-$beta" --beta "$beta" --steps 200 $TRAIN --checkpoint-every 50
done
$INPO train --cache "$OUT/reward-exact.zarr" --out "$OUT/runs/beta-$BETA-long" --beta "$BETA" --steps 200 $TRAIN --checkpoint-every 50
$INPO train --cache "$OUT/reward-authors.zarr" --out "$OUT/runs/authors" --beta "$BETA" --steps "$STEPS" $TRAIN --checkpoint-every "$STEPS"
RUNS=()
for beta in 500 5000 "$BETA-long"; do
  for step in 50 100 200; do RUNS+=(--run "beta-$beta@$step=$OUT/runs/beta-$beta@$step"); done
done
$INPO world eval --eval-seeds "$SEEDS" "${RUNS[@]}" --run "authors=$OUT/runs/authors" --json "$OUT/sweep.json"
