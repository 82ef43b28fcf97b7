#!/usr/bin/env bash
# The prepared GPU check (issue 20.6; benchmarks/gpu_check.py says what it runs and prints).
#
# On the lent nvidia-h200 machine (PyTorch, transformers, accelerate and peft installed; trl, datasets, math-verify
# ... not; nothing can be downloaded there): first, here, `bash benchmarks/gpu_wheels.sh` puts the missing wheels in
# .whl/ (git-ignored); then the device call carries `.whl` and runs
#     bash benchmarks/gpu_check.sh                        # every GPU case, ~0.5B model, figures to $OUT/gpu_check.json
#     bash benchmarks/gpu_check.sh --only ppo_bf16 --steps 2
# Here, a CPU smoke run:  bash benchmarks/gpu_check.sh --model-size tiny --device cpu --steps 2 --batch 4
#
# The wheels in $GPU_CHECK_WHEELS (default .whl) are installed without an index into $GPU_CHECK_SITE (default
# /tmp/site), which goes first on PYTHONPATH; --dry-run and --help install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}

install=1
for arg in "$@"; do
  case "$arg" in --dry-run|-h|--help) install=0 ;; esac
done
if [ "$install" = 1 ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 WANDB_DISABLED=true PYTHONUNBUFFERED=1
if [ "$install" = 1 ]; then  # the stack as this run sees it, and a clear stop if a package is missing
  "$PY" - <<'PYEOF' || { echo "gpu_check.sh: a package is missing; bash benchmarks/gpu_wheels.sh, then carry .whl" >&2; exit 3; }
import importlib
for name in ("torch", "transformers", "accelerate", "trl", "datasets", "pyarrow", "peft", "math_verify"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}")
PYEOF
fi
exec "$PY" -m benchmarks.gpu_check "$@"
