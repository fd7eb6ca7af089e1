#!/bin/bash
# bench/estimate.py on the GPU machine (the workplace's `device` tool: no network), in one call or
# several on a warm machine: build llama-cpp-python with CUDA there (once), install orion, measure.
# Prepare .gpu as bench/gpu_device.sh says (the trimmed sdist and the wheels), then run, carrying .gpu:
#   EST_ARGS="--contexts 4096,16384,65536" bash bench/estimate_device.sh
source bench/device_engine.sh
LEFT=$(( ${LIMIT:-570} - ($(date +%s) - T0) ))
python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew --out "$OUT/estimate-gpu.json" \
  --deadline $(( LEFT - 60 )) ${EST_ARGS}
