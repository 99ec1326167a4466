#!/usr/bin/env bash
# Every GPU measurement in one go (what the issue notes quote); bench_gpu.py alone is sized for ~8 minutes on an
# H200 (`python benchmarks/bench_gpu.py`), the whole script ~16 (the first run took 7;
# since then: fast mode with the Pillow resize in the workers vs on the GPU, decode-only worker scaling, the fill
# benchmark, pil-host/pil-device FDMetric rows, bench_resize.py, and the regional compile in the
# "fast + torch.compile" rows; benchmarks/bench_compile.py, whole vs regional, is not included: ~2 more minutes):
#     bash benchmarks/run_gpu.sh [N_IMAGES]        # results in $OUT, else benchmarks/results/
# Needs python3 with torch (CUDA), fd_eval importable, and the `dinov2` package (pip install --no-deps
# dinov2==0.0.1.dev2) for the baseline. Each step runs even when an earlier one failed.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
n=${1:-8000}
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import os, torch, torchvision, timm, numpy, PIL; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'pillow', PIL.__version__, \
'cpus', len(os.sched_getaffinity(0)), 'gpu', torch.cuda.get_device_name())"
  $py -c "import fd_eval, dinov2.models.vision_transformer; print('imports ok')"
} 2>&1 | tee "$out/gpu.txt"
# issue 16 first (its rows within ~8 minutes on an H200): exact IEEE vs 3xTF32, fast eager/compiled, fp8, baseline,
# decode-only worker scaling, 50K end to end; JSON to benchmarks/results/gpu_<card>.json
$py benchmarks/bench_gpu.py --out-dir "$out" 2>&1 | tee "$out/bench_gpu.log"
$py benchmarks/bench_resize.py --json "$out/resize_gpu.json" 2>&1 | tee "$out/resize.log"
$py benchmarks/bench_metric.py --batches 8 --json "$out/metric_gpu.json" 2>&1 | tee "$out/metric.log"
# part 2 (host decode scaling, two resize placements x six worker counts) decodes 2,048 of the images per run
$py benchmarks/bench_pipeline.py --n "$n" --model-batches 10 --repeats 2 --json "$out/pipeline_gpu.json" 2>&1 \
  | tee "$out/pipeline.log"
$py benchmarks/bench_precision.py --device cuda --models dinov2-vitl14 inception-v3-tf --n 256 --batch-size 128 \
  --modes fast bf16 tf32 tf32-conv torch-resize fp8 split3 \
  --json "$out/precision_gpu.json" 2>&1 | tee "$out/precision.log"
$py -m pytest -q -p no:cacheprovider tests/test_sources.py -k "pin" 2>&1 | tail -5 | tee -a "$out/gpu.txt"
