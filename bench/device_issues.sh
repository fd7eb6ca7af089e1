#!/bin/bash
# Every GPU measurement issues 21 and 23 ask for, in one lease of the GPU machine (the workplace's `device`
# tool: no network, a call at most 600 s, the machine given back 30 s after a call). The steps run in
# the background of the machine, one after another; each call waits on them for up to LIMIT seconds,
# prints what the log gained, and brings back the results so far. Call again at once (within the
# machine's idle release) until it says "all steps done".
#
# Prepare .gpu as bench/gpu_device.sh says (the trimmed sdist, the wheels, .gpu/minilm without its
# weights, .gpu/minilm-f16.gguf), then, carrying those four paths (64 MiB: the Q8_0 encoder is made there):
#   bash bench/device_issues.sh
#
# Steps (each its own log section; a failed step does not stop the next):
#  1. the engine built with CUDA (bench/device_engine.sh), orion installed;
#  2. the encoder grid (bench/gpu.py --stages embed): contexts x sequences a decode, against
#     sentence-transformers fp32 and fp16 (batch 32 and 512); the fastest setting whose vectors keep a
#     cosine of 0.999 is used by the steps after it (ORION_ENCODER_GPU), and run once more with
#     ggml-cuda's CUDA graphs off (GGML_CUDA_DISABLE_GRAPHS=1): what the graphs are worth;
#  3. issue 21's held-out memory cells (bench/estimate-heldout.args);
#  4. `orion embed DIR` on >= 10,000 chunks of the stdlib against sentence-transformers (bench/embed.py);
#  5. `orion serve` with 1, 3 and 8 embedding clients against the same peer (bench/serve.py --parts g);
#  6. issue 23's crash: three fresh homes, import then the first embed (bench/embed_first_device.sh);
#  7. issue 21's whole matrix (8 architectures x 3 contexts x 2 KV types, BERT, MiniLM), until the lease ends.
# STEPS="2 4 5 6" runs only those (the engine, step 1, always runs).
W=/tmp/issues
if [ "$1" != "--run" ]; then
  T0=$(date +%s)
  mkdir -p $W/out
  if [ ! -f $W/pid ]; then
    setsid nohup bash bench/device_issues.sh --run > $W/log 2>&1 < /dev/null &
    echo $! > $W/pid
  fi
  while kill -0 "$(cat $W/pid)" 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $(( ${LIMIT:-570} - 10 )) ]; do
    sleep 3
  done
  seen=$(cat $W/seen 2>/dev/null || echo 0)
  tail -c +$(( seen + 1 )) $W/log
  stat -c %s $W/log > $W/seen
  cp $W/out/* "$OUT/" 2>/dev/null
  rm -f $W/out/*.part-*  # the engine's wheel comes back once
  kill -0 "$(cat $W/pid)" 2>/dev/null && echo "== still running: call again" || echo "== all steps done"
  exit 0
fi

step() { echo; echo "== step $1 after $(( $(date +%s) - START )) s"; }
want() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }
START=$(date +%s)
step "1: engine"
source bench/device_engine.sh || exit 1
export LIMIT=100000 NCCL_NVLS_ENABLE=0
ls -l /tmp/w/*.whl
( cd $W/out && split -b 15M /tmp/w/*.whl llama_cpp_python-cuda-sm90.whl.part- ) # for a later lease: no build
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p /tmp/gw && rm -rf /tmp/gw/minilm && cp -r .gpu/minilm /tmp/gw/minilm
python3 bench/minilm_from_gguf.py .gpu/minilm-f16.gguf /tmp/gw/minilm/model.safetensors
# the Q8_0 encoder of the held-out cells, converted here (both GGUFs are more than a call carries)
{ want 3 || want 7; } && [ ! -f .gpu/minilm-q8_0.gguf ] && python3 -m orion_cli.convert /tmp/gw/minilm .gpu/minilm-q8_0.gguf q8_0

if want 2; then
step "2: encoder grid"
python3 bench/gpu.py --stages embed --minilm /tmp/gw/minilm --out /tmp/grid --work /tmp/gw --threads "$(nproc)" \
  --chunks 6000 --types ${GRID_TYPES:-f16,bf16} --pools ${GRID_POOLS:-8,16} --packs ${GRID_PACKS:-1,2,4}
cp /tmp/grid/gpu-embed.json $W/out/grid.json
# orion converts an encoder to F16 for a GPU: its fastest F16 setting is what the later steps use
BEST=$(python3 -c "
import json
r = json.load(open('/tmp/grid/gpu-embed.json'))['orion']
r = max((x for x in r if x['min_cosine'] >= 0.999 and x['type'] == 'f16'), key=lambda x: x['chunks_s'])
print(f\"{r['contexts']},{r['pack']}\")")
echo "fastest: contexts,pack = $BEST"
export ORION_ENCODER_GPU=$BEST
IFS=, read -r C P <<< "$BEST"
if [ -z "$SKIP_NO_GRAPHS" ]; then
GGML_CUDA_DISABLE_GRAPHS=1 python3 bench/gpu.py --stages embed --minilm /tmp/gw/minilm --out /tmp/grid-ng \
  --work /tmp/gw --threads "$(nproc)" --chunks 6000 --types f16 --pools "$C" --packs "$P"
cp /tmp/grid-ng/gpu-embed.json $W/out/grid-no-graphs.json
fi
fi

if want 3; then
step "3: held-out memory cells (issue 21)"
python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew --out $W/out/estimate-heldout.json \
  $(cat bench/estimate-heldout.args)
fi

if want 4; then
step "4: orion embed DIR against sentence-transformers"
python3 - <<'EOF'
import shutil, sysconfig
from pathlib import Path
lib, dst, total = Path(sysconfig.get_paths()["stdlib"]), Path("/tmp/corpus"), 0
skip = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "dist-packages", "ensurepip",
        "pydoc_data", "encodings", "__pycache__"}
files = sorted(lib.glob("*.py")) + sorted(p for p in lib.glob("*/**/*.py") if not skip & set(p.relative_to(lib).parts))
for p in files:
    if total > 9_600_000:
        break
    (dst / p.relative_to(lib)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(p, dst / p.relative_to(lib))
    total += p.stat().st_size
print(f"corpus: {sum(1 for _ in dst.rglob('*.py'))} files, {total / 1e6:.1f} MB from {lib}")
EOF
python3 bench/embed.py --corpus /tmp/corpus --device gpu --minilm /tmp/gw/minilm --peers st --rounds 2 --profile \
  --out $W/out/embed-dir.json
fi

if want 5; then
step "5: orion serve, 1, 3 and 8 embedding clients"
python3 bench/serve.py --parts g --device gpu --minilm /tmp/gw/minilm --corpus /tmp/corpus --peers st \
  --peer-batch 512 --rounds 2 --out $W/out/serve-embed.json
fi

if want 6; then
step "6: import then the first embed, three fresh homes (issue 23's crash)"
OUT=$W/out bash bench/embed_first_device.sh
fi

if want 7; then
step "7: the whole memory matrix (issue 21)"
python3 bench/estimate.py --device gpu --threads "$(nproc)" --work /tmp/ew --out $W/out/estimate-matrix.json \
  --model minilm=.gpu/minilm-f16.gguf --contexts 4096,16384,65536
fi
step "end"
