#!/usr/bin/env bash
# Download into .whl/ exactly the wheels benchmarks/gpu_check.sh needs on the lent nvidia-h200 machine, which has
# PyTorch, transformers, accelerate, peft, numpy, pyarrow, pandas, sympy, huggingface-hub, tokenizers, safetensors ...
# (/work/.library/device/KINDS.md) but not the rest of constraints.txt. Missing there, with the dependencies of each
# that the image also lacks (read off each wheel's Requires-Dist):
#   trl 1.16.0, datasets 5.2.0 (+ dill, multiprocess), math-verify 0.9.0 (+ latex2sympy2_extended,
#   antlr4-python3-runtime), evaluate 0.4.6, jsonschema 4.26.0 (+ jsonschema-specifications, referencing, rpds-py),
# and transformers 5.23.0, the version this package is tested with (the image had 5.17.0). About 16 MB in all.
# Python 3.12, x86-64 (the machine's python3), as the device README prescribes; run here, in the repo.
# Extra NAME==VERSION arguments are downloaded too, e.g. `bash benchmarks/gpu_wheels.sh pyarrow==26.0.1` if the
# image's pyarrow turns out older than datasets 5.2 needs (>= 24; gpu_check.sh prints the versions it finds).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
  trl==1.16.0 transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 evaluate==0.4.6 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 "$@"
ls -la "$DEST"
