#!/bin/bash
# Issue 23's crash on the GPU machine: the first `orion embed` after `orion import` of the encoder's
# folder, in a fresh ORION_HOME (that call converts the folder first), three times; each followed by a
# second call, whose vectors the first's must equal. Prepare .gpu as bench/gpu_device.sh says (the
# trimmed sdist, the wheels, .gpu/minilm without its weights, .gpu/minilm-f16.gguf), then run:
#   bash bench/embed_first_device.sh        (carrying .gpu/whl, the sdist, .gpu/minilm, .gpu/minilm-f16.gguf)
source bench/device_engine.sh
rm -rf /tmp/gw/minilm && mkdir -p /tmp/gw && cp -r .gpu/minilm /tmp/gw/minilm
python3 bench/minilm_from_gguf.py .gpu/minilm-f16.gguf /tmp/gw/minilm/model.safetensors || exit 1
for i in 1 2 3; do
  export ORION_HOME=$(mktemp -d)
  python3 -m orion_cli import /tmp/gw/minilm --name minilm >/dev/null || exit 1
  printf 'one\ntwo\n' | python3 -X faulthandler -m orion_cli embed - --jsonl --local >/tmp/gw/first.jsonl 2>"$OUT/first$i.err"
  echo "try $i: the first embed exited $?"
  printf 'one\ntwo\n' | python3 -m orion_cli embed - --jsonl --local >/tmp/gw/second.jsonl
  echo "try $i: the second embed exited $?"
  python3 -c "
import json, sys
a, b = ([json.loads(l)['embedding'] for l in open(f)] for f in ('/tmp/gw/first.jsonl', '/tmp/gw/second.jsonl'))
print('try $i: vectors', len(a), len(b), 'largest difference', max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)))"
done
