#!/usr/bin/env bash
# The comparison environment for benchmarks/ppo_vs_trl112.py: TRL 1.12, the last release with PPOTrainer
# (trl.experimental.ppo), with the transformers it supports. torch is pinned first (local CPU wheel). peft is
# installed as in our environment (the same pin): both TRLs import it at start-up when it is there, so leaving it
# out would credit TRL 1.12 with ~7 MiB less memory for a package difference, not a trainer difference.
set -euo pipefail
VENV=${1:-.venv-trl112}
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet "trl==1.12.0" "transformers==5.17.0" "peft==0.21.2" accelerate datasets
echo "ready: $VENV/bin/python"
