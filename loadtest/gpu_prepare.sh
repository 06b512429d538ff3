#!/usr/bin/env bash
# Prepare what loadtest/gpu_checks.sh and loadtest/gpu_e2e.sh read on a GPU machine that has
# Python 3.12 and torch but no network: run this here (where pip reaches an index), then copy
# the repository with its ignored .whl/ and .gpu/ folders to that machine.
#
#   .whl/           cp312 manylinux wheels of the web stack the server and the e2e client need,
#                   at the versions this checkout's .venv runs (so the GPU run tests the same code)
#   .gpu/data/      the paper's trace (../shared/data/torpor-trace-samples.npy), for the trace rows
#   .gpu/examples/  Triton's client examples, from TRITON_CLIENT_EXAMPLES (src/python/examples of
#                   triton-inference-server/client), for the unmodified-client runs
#   .gpu/perf_analyzer/  Triton's perf_analyzer (bin/) and the two libraries it loads (lib/), from
#                   what `loadtest/perf_analyzer.py --fetch` put in .tools/ (fetched here if absent)
#
# Both folders are git-ignored. Prints the total size (a machine that takes the working tree by
# copy may cap it).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
opentelemetry-api uvicorn httptools orjson tritonclient python-rapidjson geventhttpclient gevent
greenlet zope.event zope.interface brotli protobuf grpcio"
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl .gpu/data
pins=""
for p in $PKGS; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  if [ -z "$v" ]; then echo "gpu_prepare: $p is not installed in $PY's environment (make test installs it)" >&2; exit 1; fi
  pins="$pins $p==$v"
done
rm -f .whl/*.whl  # one version of each: two of one package stop the install there
# pip matches a manylinux tag exactly: list the ones these packages ship
plats=""
for n in 17 24 27 28 31 34 35; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
trace=../shared/data/torpor-trace-samples.npy
if [ -f "$trace" ]; then cp "$trace" .gpu/data/; else echo "gpu_prepare: no $trace: the trace rows will be skipped" >&2; fi
if [ -n "${TRITON_CLIENT_EXAMPLES:-}" ] && [ -d "$TRITON_CLIENT_EXAMPLES" ]; then
  rm -rf .gpu/examples && cp -r "$TRITON_CLIENT_EXAMPLES" .gpu/examples
else
  echo "gpu_prepare: TRITON_CLIENT_EXAMPLES not set: the unmodified-client runs will be skipped" >&2
fi
pa=.tools/perf_analyzer
[ -x "$pa/tritonclient-2.34.0.data/data/bin/perf_analyzer" ] || "$PY" loadtest/perf_analyzer.py --fetch
rm -rf .gpu/perf_analyzer && mkdir -p .gpu/perf_analyzer/bin .gpu/perf_analyzer/lib
cp "$pa/tritonclient-2.34.0.data/data/bin/perf_analyzer" .gpu/perf_analyzer/bin/
cp "$pa"/libb64/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$pa"/cudart/nvidia/cuda_runtime/lib/libcudart.so.12 \
  .gpu/perf_analyzer/lib/
echo "wheels: $(ls .whl | wc -l); .whl + .gpu: $(du -sh .whl .gpu | awk '{print $1}' | paste -sd+ -)"
