#!/usr/bin/env bash
# Run HERE (a machine with the package registry), before a GPU check: downloads into .whl/ (git-ignored
# through .git/info/exclude) the wheels the GPU machine's image lacks: flash-linear-attention and fla-core
# 0.6.0, and transformers 5.24.0 (the image has 5.17). Its torch, triton, tokenizers, safetensors and
# huggingface_hub are used as they are. Then, with the `device` tool:
#   run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python=.venv/bin/python; [ -x "$python" ] || python=python3
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0 transformers==5.24.0
ls -l .whl
