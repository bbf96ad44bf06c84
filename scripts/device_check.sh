#!/usr/bin/env bash
# Run ON THE GPU MACHINE through the `device` tool, after `bash scripts/device_wheels.sh` here:
#   run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=540)
# 1. installs the carried wheels into /tmp/site (the image's torch and triton stay);
# 2. the fla kernels against our PyTorch reference and the GPU benchmark's own test (`pytest -m gpu`);
# 3. the mixers benchmark on the GPU (T up to 64K, fla rows) as JSON and markdown;
# 4. the inference benchmark on the GPU (bfloat16, contexts up to 64K) on SmolLM2-135M's architecture with
#    random weights (the real weights are not on that machine; speed does not depend on them).
# Everything it reports lands in $OUT: gpu.txt, pytest_gpu.log, mixers_cuda.{json,md}, inference_cuda/, inference_cuda.log.
set -uo pipefail
OUT=${OUT:-/tmp/dtr-device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing the carried wheels failed; run scripts/device_wheels.sh first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'fla', fla.__version__)" | tee -a "$OUT/gpu.txt"
status=0
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops_gpu.py tests/test_bench_gpu.py \
    2>&1 | tee "$OUT/pytest_gpu.log" || status=1
timeout 240 python3 -m benchmarks.mixers --device cuda --json > "$OUT/mixers_cuda.json" || status=1
python3 -c "import json, sys; from benchmarks.mixers import markdown; print(markdown(json.load(open(sys.argv[1]))))" \
    "$OUT/mixers_cuda.json" | tee "$OUT/mixers_cuda.md" || status=1
timeout 300 python3 -m benchmarks.inference --device cuda --model smollm2-135m-random \
    --layers-from docs/bench/placements/greedy_order_sentiment.json --out "$OUT/inference_cuda" \
    > "$OUT/inference_cuda.log" 2>&1 || status=1
tail -n 40 "$OUT/inference_cuda.log"
exit $status
