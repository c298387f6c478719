#!/usr/bin/env bash
# The sweeps behind docs/simulators.md. Each writes runs/<scenario>/{windows.csv,summary.json,
# curves.png,breadth.png} and prints its table; progress goes to stderr.
# Usage: simulators/run_sweeps.sh [core|extra|all]   (core: drift, steady, clickbait)
set -euo pipefail
cd "$(dirname "$0")/.."
SIM="${BANDIT_SIM:-.venv/bin/bandit-service} simulate"
what="${1:-core}"

if [[ "$what" == core || "$what" == all ]]; then
  $SIM --scenario drift --steps 20000 --sweep epsilon=0,0.05,0.1,0.2 --seeds 3 --out runs/drift
  $SIM --scenario steady --steps 20000 --sweep epsilon=0,0.05,0.1,0.2 --seeds 3 --out runs/steady
  $SIM --scenario clickbait --steps 20000 --sweep objective=click,satisfaction --seeds 3 \
       --out runs/clickbait
fi
if [[ "$what" == extra || "$what" == all ]]; then
  $SIM --scenario position_bias --steps 10000 --sweep exploration_slots=none,2 --seeds 3 \
       --out runs/position_bias
  $SIM --scenario cold_start --steps 10000 --sweep epsilon=0,0.05 --sweep exploration_share=0,0.1 \
       --sweep exploration_distribution=least_shown --seeds 3 --out runs/cold_start
  $SIM --scenario delayed --steps 10000 --sweep holdout_share=0,0.1 --seeds 3 --out runs/delayed
  $SIM --scenario large_catalog --steps 5000 --sweep algorithm=epsilon,squarecb --seeds 2 \
       --out runs/large_catalog
fi
