#!/usr/bin/env bash
# The comparison environment for benchmarks/ppo_vs_trl112.py: TRL 1.12, the last release with PPOTrainer
# (trl.experimental.ppo), with the transformers it supports. torch is pinned first (local CPU wheel).
set -euo pipefail
VENV=${1:-.venv-trl112}
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet "trl==1.12.0" "transformers==5.17.0" accelerate datasets
echo "ready: $VENV/bin/python"
