# Sourced by bench/gpu_device.sh and bench/estimate_device.sh on the GPU machine (no network): the
# wheels of .gpu/whl into /tmp/site, llama-cpp-python built there with CUDA from the trimmed sdist
# (once a machine: a warm one keeps /tmp/w), then orion itself. Sets T0, PIP, PYTHONPATH, ORION_HOME.
T0=$(date +%s)
export ORION_HOME=/tmp/oh PYTHONUNBUFFERED=1
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
export PYTHONPATH=/tmp/site
if ! ls /tmp/w/*.whl >/dev/null 2>&1; then
  $PIP .gpu/whl/*.whl || exit 1
  mkdir -p /tmp/b && tar xzf .gpu/llama_cpp_python-0.3.36.tar.gz -C /tmp/b
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip wheel -q --no-deps --no-build-isolation /tmp/b/llama_cpp_python-0.3.36 -w /tmp/w \
    > /tmp/build.log 2>&1 || { tail -50 /tmp/build.log; exit 1; }
  echo "engine built after $(( $(date +%s) - T0 )) s"
  $PIP /tmp/w/*.whl || exit 1
fi
# `python3 -m orion_cli` in the repository root runs the source tree, whose profiles live beside it
[ -e orion_cli/profiles ] || ln -s ../profiles orion_cli/profiles
$PIP --no-build-isolation . >/dev/null || exit 1   # --upgrade: a warm machine keeps the last call's /tmp/site
# the wheels must match pyproject's pins (typer 0.29 broke every command there: --no-deps checks nothing)
python3 -m orion_cli --help >/dev/null || { echo "orion's CLI does not start: check .gpu/whl against pyproject.toml"; exit 1; }
