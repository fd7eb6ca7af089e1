#!/bin/bash
# bench/estimate.py on the GPU machine (the workplace's `device` tool: no network), in one call or
# several on a warm machine: build llama-cpp-python with CUDA there (once), install orion, measure.
# Prepare .gpu as bench/gpu_device.sh says (the trimmed sdist and the wheels), then run, carrying .gpu:
#   EST_ARGS="--contexts 4096,16384,65536" bash bench/estimate_device.sh
T0=$(date +%s)
export ORION_HOME=/tmp/oh PYTHONUNBUFFERED=1
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
export PYTHONPATH=/tmp/site
if ls .gpu/cuda-whl/*.whl >/dev/null 2>&1 && ! ls /tmp/w/*.whl >/dev/null 2>&1; then
  $PIP .gpu/whl/*.whl .gpu/cuda-whl/*.whl || exit 1   # the CUDA build a previous call brought back
  mkdir -p /tmp/w && cp .gpu/cuda-whl/*.whl /tmp/w/
fi
if ! ls /tmp/w/*.whl >/dev/null 2>&1; then
  $PIP .gpu/whl/*.whl || exit 1
  mkdir -p /tmp/b && tar xzf .gpu/llama_cpp_python-0.3.36.tar.gz -C /tmp/b
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip wheel -q --no-deps --no-build-isolation /tmp/b/llama_cpp_python-0.3.36 -w /tmp/w \
    > /tmp/build.log 2>&1 || { tail -50 /tmp/build.log; exit 1; }
  echo "engine built after $(( $(date +%s) - T0 )) s"
  $PIP /tmp/w/*.whl || exit 1
fi
[ -n "$SAVE_WHEEL" ] && cp /tmp/w/*.whl "$OUT/"
$PIP --no-build-isolation . >/dev/null || exit 1
LEFT=$(( ${LIMIT:-570} - ($(date +%s) - T0) ))
python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew --out "$OUT/estimate-gpu.json" \
  --deadline $(( LEFT - 60 )) ${EST_ARGS}
