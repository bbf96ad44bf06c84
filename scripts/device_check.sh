#!/usr/bin/env bash
# Run ON THE GPU MACHINE through the `device` tool, after `bash scripts/device_wheels.sh` here:
#   run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=540)
# 1. installs the carried wheels into /tmp/site (the image's torch and triton stay);
# 2. the fla kernels against our PyTorch reference and the GPU benchmark's own test (`pytest -m gpu`);
# 3. the mixers benchmark on the GPU (T up to 64K, fla rows) as JSON and markdown;
# 4. the inference benchmark on the GPU (bfloat16, contexts up to 64K) on SmolLM2-135M's architecture with
#    random weights (the real weights are not on that machine; speed does not depend on them);
# 5. streaming distillation at 1e7 training tokens per layer (all 30 layers of that model in one block, sequences
#    of 4096, bf16 autocast, the fla kernels) on the repository's own text as corpus: tokens/s, peak GPU memory and
#    the students folder's size, which must not depend on the budget.
# Everything it reports lands in $OUT: gpu.txt, pytest_gpu.log, mixers_cuda.{json,md}, inference_cuda/, inference_cuda.log,
# distill_stream.log.
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
find . -name '*.py' -o -name '*.md' | sort | xargs cat > /tmp/dtr-corpus.txt
timeout 300 python3 - <<'PY' 2>&1 | tee "$OUT/distill_stream.log" || status=1
import shutil, subprocess, time, torch
from dtr_core.distill.block import distill_block
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.models import load_model
model, tokenizer = load_model("smollm2-135m-random")
model = model.cuda().eval()
config = DistillConfig.for_tokens(10_000_000, seq_lens=(4096,))
students = "/tmp/dtr-stream-students"
shutil.rmtree(students, ignore_errors=True)
start = time.perf_counter()
progress = lambda step, steps, loss, tokens: print(f"step {step}/{steps} loss {loss:.4f} tokens {tokens} "
                                                   f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", flush=True)
results = distill_block(model, list(range(model.config.num_hidden_layers)), "gated_deltanet", config,
                        Corpus("/tmp/dtr-corpus.txt", tokenizer), students, progress=progress)
wall = time.perf_counter() - start
disk = subprocess.run(["du", "-sb", students], capture_output=True, text=True).stdout.split()[0]
losses = sorted(r.normalized_loss for r in results if r.normalized_loss is not None)
print(f"layers {len(results)} ok {sum(r.status == 'ok' for r in results)} steps {config.steps} x "
      f"{config.tokens_per_step} tokens; wall {wall:.0f} s; {config.steps * config.tokens_per_step / wall:,.0f} "
      f"training tokens/s per layer; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
      f"students folder {int(disk) / 2**20:.0f} MiB; normalised loss median {losses[len(losses) // 2]:.3f}")
PY
exit $status
