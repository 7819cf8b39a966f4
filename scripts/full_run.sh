#!/usr/bin/env bash
# The full run (docs/reports/benchmark-runs.md): ResNet-18 at budgets 0.3 / 0.5 / 0.7, every method,
# seeds 0 1 2, 800 fine-tune steps.
# Two benchmark processes per (budget, seed), all at once on one device (on one GPU they share it), without
# latency timing; then one merged report, and the exported nets timed serially on this machine's CPU.
#   DEVICE=cuda OUT=results/full bash scripts/full_run.sh
# A rerun skips the rows already in OUT/parts/*/results.csv (e.g. after a time limit stopped it).
set -eu
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
OUT=${OUT:-results/full}
EPISODES=${EPISODES:-30}
STEPS=${STEPS:-800}
A="channel_gating grda polarization uniform l1 channel_gating_topk"
B="l1_merge pfp random random_search scop"
mkdir -p "$OUT/parts"
$PY -c "import envs, gymnasium as gym; gym.make('ChannelPrune-ResNet18-v0', device='$DEVICE')"  # fills the cache once
for b in 0.3 0.5 0.7; do for s in 0 1 2; do
  OMP_NUM_THREADS=1 $PY -m baselines.experiments.benchmark --budgets $b --seeds $s --baselines $A --agents \
    --episodes "$EPISODES" --finetune-steps "$STEPS" --device "$DEVICE" --latency none \
    --out "$OUT/parts/b$b-s$s-a" > "$OUT/parts/b$b-s$s-a.log" 2>&1 &
  OMP_NUM_THREADS=1 $PY -m baselines.experiments.benchmark --budgets $b --seeds $s --baselines $B --agents ppo ddpg \
    --episodes "$EPISODES" --finetune-steps "$STEPS" --device "$DEVICE" --latency none \
    --out "$OUT/parts/b$b-s$s-b" > "$OUT/parts/b$b-s$s-b.log" 2>&1 &
done; done
wait
$PY -m baselines.experiments.benchmark --merge "$OUT"/parts/b*-s*-? --out "$OUT" --finetune-steps "$STEPS" > /dev/null
$PY -m baselines.experiments.benchmark --retime cpu --out "$OUT" --finetune-steps "$STEPS"
