#!/usr/bin/env bash
# The GPU checks of the batched engine in one run (prepared for a session lent a CUDA machine;
# CI never runs it): the CUDA tests, tiny end-to-end pre-trainings and the host syncs per step
# (benchmarks/gpu_train_check.py), the engine's GPU images/s at 32 and 224 px, and the engine,
# eager and compiled (augment.compile), against a ResNet-50 BYOL step (benchmarks/feed_rate.py).
# Results go to $OUT (the device tool's folder) or benchmarks/results/gpu_check. Its steps' time
# limits add up to 570 s: run it with the device tool's timeout at 600 s.
#
# The device image has torch, torchvision, lightning, timm and pytest but not pydantic. Before
# the run, on the development machine, in the repo root (see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions
# then run `bash benchmarks/gpu_check.sh` there with .whl carried.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log="$out/gpu_check.log"  # one log: the device tool brings back at most 8 files
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
python3 -c "import torch, massrl; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$log" || exit 1
# the CUDA tests only: the CPU ones run in CI, and the CPU compile tests alone take a minute
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_batched_engine.py -k cuda \
  2>&1 | tee -a "$log"
# tiny pre-trainings as a user runs them (batched, resumed, 16-mixed, per-image for the
# end-to-end gain), knn on the GPU, and the host synchronisations per training step
timeout 150 python3 benchmarks/gpu_train_check.py --out "$out/train_check_gpu.json" 2>&1 \
  | tee -a "$log"
timeout 80 python3 benchmarks/augment_throughput.py --cuda --sizes 32 224 --strategies massrl \
  --repeats 1 --per-image-images 32 --out "$out/augment_throughput_gpu.json" 2>&1 \
  | tee -a "$log"
timeout 220 python3 benchmarks/feed_rate.py --compile --out "$out/feed_rate_gpu.json" \
  --profile "$out/engine_ops_gpu.txt" 2>&1 | tee -a "$log"
