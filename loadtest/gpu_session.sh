#!/usr/bin/env bash
# A lent GPU's whole run as ONE device call, the open issues' GPU checks in the order the issues
# are taken, within BUDGET seconds (default 540: a call may run 600, and a session's 15 minutes
# include the machine's start):
#
#   1. info: GPU, driver, torch                                                    ~5 s
#   2. issue 16's rows at load 0.5 (gpu_e2e.sh: trace and Zipf bursts, native and
#      Torpor at a quarter of the bytes, 40 models, 30 s runs)                     ~230 s (H100)
#   3. issue 21's throughput: perf_analyzer on resnet50 resident on the GPU,
#      c = 1, 8, 32, HTTP and gRPC (gpu_checks.sh step pa)                         ~150 s
#   4. pytest -m gpu (swap engine, CUDA shared memory)                             ~60 s
#   5. swap_bench (cold and resident latency per model shape)                      ~60 s
#
# A step starts only with at least MIN_LEFT (60) seconds left and is cut at the deadline, so the
# call ends in time with what it has. Run loadtest/gpu_prepare.sh here first (wheels, trace,
# perf_analyzer under .whl/ and .gpu/) and carry those two folders:
#
#   run(command="OUT=$OUT bash loadtest/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=590)
#
# The device tool returns at most 8 files, so the steps write to a scratch folder and $OUT
# (default ./gpu-results) gets: session.txt (everything printed, the tables included), e2e.json,
# perf_analyzer_resnet50.json, swap_bench.json, pytest-gpu.log, server-torpor.log, gpu.txt and
# logs.tar.gz (every other file the steps wrote).
set -u
FINAL=${OUT:-gpu-results}
BUDGET=${BUDGET:-540}
MIN_LEFT=${MIN_LEFT:-60}
cd "$(dirname "$0")/.."
mkdir -p "$FINAL"
export OUT=/tmp/gpu-session-work
rm -rf "$OUT" && mkdir -p "$OUT"
export DEADLINE=$(( $(date +%s) + BUDGET ))
left() { echo $(( DEADLINE - $(date +%s) )); }
{
  STEPS=info bash loadtest/gpu_checks.sh
  if [ "$(left)" -ge $(( MIN_LEFT + 120 )) ]; then
    # gpu_e2e.sh keeps e2e.py to its own BUDGET (shortening runs to fit); leave room for the rest
    e2e_budget=$(( $(left) - 200 )); [ "$e2e_budget" -gt 300 ] && e2e_budget=300
    [ "$e2e_budget" -lt 120 ] && e2e_budget=120
    LOADS=0.5 DURATION=${DURATION:-30} BUDGET=$e2e_budget bash loadtest/gpu_e2e.sh
  fi
  for s in pa gpu bench; do
    if [ "$(left)" -lt "$MIN_LEFT" ]; then echo "gpu_session: $(left) s left: step $s not started"; continue; fi
    STEPS=$s bash loadtest/gpu_checks.sh
  done
  echo "gpu_session: done with $(left) s of ${BUDGET} left"
} 2>&1 | tee "$FINAL/session.txt"
keep="e2e.json perf_analyzer_resnet50.json swap_bench.json pytest-gpu.log server-torpor.log gpu.txt"
for f in $keep; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"; done
# shellcheck disable=SC2086
(cd "$OUT" && tar czf "$FINAL/logs.tar.gz" --exclude-from=<(printf '%s\n' $keep) . 2>/dev/null)
ls "$FINAL"
