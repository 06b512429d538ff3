#!/usr/bin/env bash
# Issue 16's end-to-end rows on a lent GPU, in one go: loads 0.25 and 0.5 x workloads trace and
# zipf bursts, native (all resident) and Torpor (a quarter of the models' bytes), HTTP, 40 models;
# one server start per configuration (loadtest/e2e.py --load 0.25,0.5 --workload both), then ONE
# table: native and Torpor p50/p99/SLO%/goodput, p99 and goodput ratios, failed/shed/lost.
#
#   bash loadtest/gpu_e2e.sh                                               # on the GPU machine
#   DEVICE=cpu:1 TINY=1 MODELS=8 DURATION=8 nice -n 19 bash loadtest/gpu_e2e.sh   # CPU rehearsal
#
# Inputs, when present: .whl/ (cp312 wheels of the web stack, installed as gpu_checks.sh does) and
# the paper's trace, ../shared/data/torpor-trace-samples.npy or .gpu/data/torpor-trace-samples.npy
# (../shared does not travel to the GPU machine: carry the trace in .gpu/data/).
# Environment: OUT (default ./gpu-results), DEVICE (cuda; cpu... adds --device-bandwidths=pcie=4 for
# the server), TINY=1 (--tiny), MODELS (40), DURATION (40 s per run), LOADS (0.25,0.5), DRAIN (10 s),
# BUDGET (480 s for e2e.py, which shortens runs to fit), REPO (/tmp/torpor-e2e-models, reused when
# the same), PYTHON (.venv/bin/python when there is one, else python3), MAX_RPS (e2e.py's cap on the
# offered rate: 400, --tiny 25; raise it on CPU to see the two loads differ).
# Under $OUT (few files: the device tool returns at most 8, no deeper than 2 folders): e2e.txt
# (e2e.py's whole output), e2e.json, server-native.log, server-torpor.log, table.txt.
set -u
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-40}
DURATION=${DURATION:-40}
LOADS=${LOADS:-0.25,0.5}
DRAIN=${DRAIN:-10}
BUDGET=${BUDGET:-480}
REPO=${REPO:-/tmp/torpor-e2e-models}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

if [ -d .whl ]; then
  # once per machine (gpu_checks.sh installs the same set the same way)
  [ -f /tmp/site/.installed ] || { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl $(ls .gpu/grpcwhl/*.whl 2>/dev/null) && touch /tmp/site/.installed; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "wheels installed in $(( $(date +%s) - T_START ))s"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ ! -f ../shared/data/torpor-trace-samples.npy ] && [ ! -f .gpu/data/torpor-trace-samples.npy ]; then
  echo "no trace: neither ../shared/data/ nor .gpu/data/ holds torpor-trace-samples.npy (the trace rows need it)"
  exit 2
fi

EXTRA=()
[ "${TINY:-0}" = 1 ] && EXTRA+=(--tiny)
[ -n "${MAX_RPS:-}" ] && EXTRA+=(--max-rps "$MAX_RPS")
case $DEVICE in cpu*) EXTRA+=(--server-arg=--device-bandwidths=pcie=4) ;; esac

# Time estimate, from the H100 run of 2026-11-23 (loadtest/measured/h100-2026-11-23/e2e.txt, 40
# models, 16 CPUs): wheels ~20 s (not measured), python + version probe 7 s, repository 10 s (0 when
# reused), per server start 22 s + warm-up 3 s + stop 3 s, per run DURATION + ~3 s set-up and drain
# (up to DRAIN when the server falls behind). CPU rehearsals differ; e2e.py prints its own estimate.
NLOADS=$(echo "$LOADS" | tr ',' '\n' | grep -c .)
RUNS=$(( 2 * NLOADS * 2 ))
D=${DURATION%.*}
EST=$(( 20 + 7 + 10 + 2 * (22 + 3 + 3) + RUNS * (D + 3) ))
WORST=$(( EST + RUNS * (DRAIN > 3 ? DRAIN - 3 : 0) ))
CAP=$(( BUDGET + 20 ))  # e2e.py keeps to BUDGET; this kills it (and its servers) if it does not
echo "gpu_e2e: $RUNS runs (native, torpor x loads $LOADS x trace, zipf) of ${DURATION}s on $DEVICE, $MODELS models"
echo "gpu_e2e: estimate on the GPU (H100-measured steps) ~${EST}s ($(( (EST + 59) / 60 )) min), worst ~${WORST}s" \
     "if every run drains ${DRAIN}s; e2e.py budget ${BUDGET}s, killed at ${CAP}s: at most ~$(( (CAP + 25 + 59) / 60 ))" \
     "min with the wheels, not counting the machine's own start"

rm -f "$OUT/e2e.json"  # a table from an older run must not pass for this one
# e2e.py's whole output goes to e2e.txt; here only its timestamped progress and shed lines
timeout -k 10 "$CAP" "$PYTHON" loadtest/e2e.py --device "$DEVICE" --models "$MODELS" --fraction 0.25 \
    --protocol http --workload both --load "$LOADS" --duration "$DURATION" --drain-s "$DRAIN" \
    --budget-s "$BUDGET" --repo "$REPO" --json "$OUT/e2e.json" --logs "$OUT" "${EXTRA[@]}" 2>&1 \
  | tee "$OUT/e2e.txt" | grep --line-buffered -E '^\[|^shed:'
RC=${PIPESTATUS[0]}
[ "$RC" = 124 ] && echo "gpu_e2e: e2e.py killed after ${CAP}s"

echo
if [ -f "$OUT/e2e.json" ]; then
  "$PYTHON" loadtest/e2e.py --table "$OUT/e2e.json" | tee "$OUT/table.txt"
else
  echo "no $OUT/e2e.json; the end of e2e.txt:"; tail -20 "$OUT/e2e.txt"
fi
echo "gpu_e2e: e2e.py exit $RC; took $(( $(date +%s) - T_START ))s (estimate ~${EST}s)"
exit "$RC"
