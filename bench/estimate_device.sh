#!/bin/bash
# bench/estimate.py on the GPU machine (the workplace's `device` tool: no network), in one call or
# several on a warm machine: build llama-cpp-python with CUDA there (once), install orion, measure.
# Prepare .gpu as bench/gpu_device.sh says (the trimmed sdist and the wheels), then run, carrying .gpu:
#   EST_ARGS="--contexts 4096,16384,65536" bash bench/estimate_device.sh
# A matrix longer than one call (600 s): EST_LONG=1 starts the run in the background of the warm
# machine and waits for it; call again (within the machine's idle release) with the same command and
# it waits on the same run, until the run ends and its table and JSON come back under $OUT.
source bench/device_engine.sh
LEFT=$(( ${LIMIT:-570} - ($(date +%s) - T0) ))
if [ -n "$EST_LONG" ]; then
  mkdir -p /tmp/est
  if [ ! -f /tmp/est/pid ]; then
    setsid nohup python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew \
      --out /tmp/est/estimate-gpu.json ${EST_ARGS} > /tmp/est/log 2>&1 < /dev/null &
    echo $! > /tmp/est/pid
  fi
  while kill -0 "$(cat /tmp/est/pid)" 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $(( ${LIMIT:-570} - 15 )) ]; do
    sleep 5
  done
  cat /tmp/est/log; cp /tmp/est/log /tmp/est/*.json "$OUT/" 2>/dev/null
  kill -0 "$(cat /tmp/est/pid)" 2>/dev/null && echo "still running: call again" || echo "run finished"
  exit 0
fi
python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew --out "$OUT/estimate-gpu.json" \
  --deadline $(( LEFT - 60 )) ${EST_ARGS}
