#!/usr/bin/env bash
# Every GPU check the project has, in one go, for a lent CUDA machine (see README "GPU checks").
# Writes logs and JSON under $OUT (default ./gpu-results). Optional inputs, when present:
#   .whl/      cp312 wheels of the web stack (fastapi, uvicorn, tritonclient, ...) to install first
#   .gpu/examples/  Triton's client examples (src/python/examples), for the unmodified-client runs
#   .gpu/perf_analyzer/  Triton's perf_analyzer, for the resident path's throughput (step pa)
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  # once per machine: a later script (gpu_session.sh runs several) finds them installed
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl $(ls .gpu/grpcwhl/*.whl 2>/dev/null) && touch /tmp/site/.installed; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu/examples ] && export TRITON_CLIENT_EXAMPLES=$PWD/.gpu/examples
STEPS=${STEPS:-"info gpu bench server pa suite"}

step() { echo; echo "=== $1 ($(date +%T))"; }
# A step's time limit: its own cap, or what is left before DEADLINE (epoch seconds; set by
# loadtest/gpu_session.sh so that the whole run fits one device call), whichever is less.
cap() { local c=$1; if [ -n "${DEADLINE:-}" ]; then local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt "$c" ] && c=$left; fi
        [ "$c" -lt 1 ] && c=1; echo "$c"; }

for s in $STEPS; do case $s in
info)
  step info
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
  ;;
gpu)
  step "pytest -m gpu"
  timeout $(cap 300) python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
  ;;
bench)
  step "swap_bench --device cuda"
  timeout $(cap 300) python3 loadtest/swap_bench.py --device cuda --json "$OUT/swap_bench.json" 2>&1 | tee "$OUT/swap_bench.txt"
  ;;
server)
  step "server on --devices cuda: cudashm examples, metrics, latency"
  python3 -m torpor.cli serve --http-address 127.0.0.1 --grpc-address 127.0.0.1 --allow-client-shm true \
      --devices cuda > "$OUT/server.log" 2>&1 &
  SPID=$!
  for _ in $(seq 180); do curl -sf localhost:8000/v2/health/ready >/dev/null && break; sleep 1; done
  if [ -d .gpu/examples ]; then
    for ex in simple_grpc_cudashm_client.py simple_http_cudashm_client.py; do
      port=8000; case $ex in simple_grpc*) port=8001;; esac
      timeout $(cap 60) python3 .gpu/examples/$ex -u localhost:$port > "$OUT/$ex.log" 2>&1; echo "$ex rc=$?"; tail -2 "$OUT/$ex.log"
    done
  fi
  timeout $(cap 120) python3 loadtest/server_latency.py --url localhost:8000 --n 30 --json "$OUT/latency_resident.json"
  curl -s localhost:8002/metrics > "$OUT/metrics.txt"; grep -E '^nv_gpu_' "$OUT/metrics.txt" | head -8
  curl -s localhost:8000/v2/torpor/residency > "$OUT/residency.json"
  kill -TERM $SPID; wait $SPID; echo "server exit $?"
  step "server with a 500 MiB arena: resnet50 + bert cannot both stay resident"
  python3 -m torpor.cli serve --http-address 127.0.0.1 --grpc-address 127.0.0.1 --devices cuda \
      --device-memory-bytes 500MiB > "$OUT/server-small.log" 2>&1 &
  SPID=$!
  for _ in $(seq 180); do curl -sf localhost:8000/v2/health/ready >/dev/null && break; sleep 1; done
  timeout $(cap 120) python3 loadtest/server_latency.py --url localhost:8000 --n 30 --json "$OUT/latency_swapping.json"
  curl -s localhost:8002/metrics | grep -E '^torpor_swap_(ins|evictions|bytes)' | tee "$OUT/swap_metrics.txt"
  kill -TERM $SPID; wait $SPID; echo "server exit $?"
  tail -3 "$OUT/server-small.log"
  ;;
pa)
  step "perf_analyzer: resnet50 resident on the GPU, HTTP and gRPC, c = 1, 8, 32"
  if [ -x .gpu/perf_analyzer/bin/perf_analyzer ]; then
    timeout $(cap 420) python3 loadtest/perf_analyzer.py --perf-analyzer .gpu/perf_analyzer/bin/perf_analyzer \
      --model resnet50 --server-arg=--devices=cuda --hosts auto,aio-pinned --runs 1 \
      --json "$OUT/perf_analyzer_resnet50.json" 2>&1 | tee "$OUT/perf_analyzer_resnet50.txt" | tail -9
  else
    echo "no .gpu/perf_analyzer (loadtest/gpu_prepare.sh): skipped"
  fi
  ;;
suite)
  step "whole suite with CUDA present"
  timeout $(cap 240) python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-all.log" | tail -15
  ;;
esac; done
