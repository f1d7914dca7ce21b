#!/usr/bin/env bash
# The GPU half of issue #18 in one run (< 8 minutes on one GPU; run from the repository root):
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
# 1. the CUDA tests of the GPU JPEG decoder (nvJPEG tiles vs the CPU reader's, within 2 grey levels);
# 2. the extract case on the GPU: ResNet-18 and ViT-S end-to-end vs forward only, JPEG tiles decoded
#    on the GPU and on the CPU (reader processes), 4,096 tiles each (targets: ResNet-18 >= 0.6x,
#    ViT-S >= 0.9x of forward only);
# 3. the whole case on the GPU: `weakstil extract` in a new process on ~430- and ~560-tile slides,
#    and 3 slides in one run vs one slide.
# Everything lands in $OUT: env.txt, pytest.txt, bench.json (+ bench.txt with the table).
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export WEAKSTIL_BENCH_DIR=${WEAKSTIL_BENCH_DIR:-/tmp/weakstil-bench}  # synthetic slides: not copied back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
start=$(date +%s)
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; uptime
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import weakstil, simplejpeg, tifffile, zarr, timm, openslide; print('imports ok', weakstil.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 120 "$PY" -m pytest tests/test_gpu_decode.py -q -x -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$? ($(tail -1 "$OUT/pytest.txt"))"
timeout 330 "$PY" -m benchmarks run --quick --device cuda --only extract whole --out "$OUT/bench.json" \
  > "$OUT/bench.txt" 2> "$OUT/bench.log"
echo "benchmarks rc=$?"
cat "$OUT/bench.txt"
echo "gpu_check: $(( $(date +%s) - start )) s"
