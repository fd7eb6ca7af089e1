#!/bin/bash
# bench/gpu.py on a GPU machine with no network (the workplace's `device` tool), in one call:
# build llama-cpp-python with CUDA there, install orion, measure. Prepare here, in the repo root:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/whl
#   - .gpu/llama_cpp_python-0.3.36.tar.gz: the sdist (pip download --no-binary :all: llama-cpp-python==0.3.36)
#     without .git folders, vendor/llama.cpp/{models,docs,media,benches,examples,tools/ui} and the
#     backends under ggml/src other than ggml-cpu, ggml-cuda, ggml-blas, ggml-rpc (6.9 MB)
#   - .gpu/whl: wheels for Python 3.12, at the versions pyproject.toml allows (typer<0.29), of gguf, diskcache, nvidia-ml-py, typer, click, rich,
#     shellingham, markdown-it-py, mdurl, pygments (pip download --only-binary=:all: --python-version 3.12)
#   - .gpu/minilm: all-MiniLM-L6-v2's folder without its weights; .gpu/minilm-f16.gguf: orion's F16
#     conversion of it (orion convert, 43 MB); bench/minilm_from_gguf.py rebuilds the float32
#     safetensors from it there for sentence-transformers (64 MiB holds one of the two, not both)
# then run, carrying .gpu:   BENCH_ARGS="--stages vram,speed,embed" bash bench/gpu_device.sh
source bench/device_engine.sh
mkdir -p /tmp/gw && cp -r .gpu/minilm /tmp/gw/minilm && cp .gpu/minilm-f16.gguf /tmp/gw/minilm-f16.gguf
python3 bench/minilm_from_gguf.py .gpu/minilm-f16.gguf /tmp/gw/minilm/model.safetensors
LEFT=$(( ${LIMIT:-570} - ($(date +%s) - T0) ))
python3 bench/gpu.py --minilm /tmp/gw/minilm --out /tmp/gb --work /tmp/gw --threads "$(nproc)" \
  --deadline $(( LEFT - 40 )) ${BENCH_ARGS}
cp /tmp/gb/gpu.json "$OUT/" 2>/dev/null
tail -c 3000000 /tmp/gb/children.log > "$OUT/children.log"
