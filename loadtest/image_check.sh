#!/usr/bin/env bash
# Build the image and check what the README promises of it: `docker run` without a mount serves
# the bundled examples (ready, an inference answers), its HEALTHCHECK passes, and with an empty
# folder mounted at /models the HEALTHCHECK fails. Prints the time each step took.
#
#   bash loadtest/image_check.sh                                   # docker, the CUDA base
#   BASE_IMAGE=python:3.11-slim bash loadtest/image_check.sh       # a CPU image
#
# Without a Docker daemon it uses podman (as root: vfs storage, chroot isolation). On machines
# that reach Debian's mirror but no image registry, DEBOOTSTRAP_BASE=1 first makes a CPU base
# (Debian bookworm's python3, with this host's CA bundle so pip trusts the same TLS chain). What
# the development machines needed besides (runc: crun refuses their hybrid cgroups; ulimits no
# higher than the host's, as the sandbox denies raising them; torch from the local wheel folder):
#
#   DEBOOTSTRAP_BASE=1 PODMAN_RUNTIME=runc \
#   RUN_ARGS="--ulimit nofile=10000:10000 --ulimit nproc=4096:4096" \
#   BUILD_ARGS="-v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels" \
#   nice bash loadtest/image_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/torpor:check}
PORT=${PORT:-28500}              # host ports PORT..PORT+2 -> 8000-8002; PORT+10 for the empty run
DEVICES=${DEVICES:-cpu}          # `torpor serve --devices` inside the container
read -r -a BUILD_EXTRA <<< "${BUILD_ARGS:-}"
read -r -a RUN_EXTRA <<< "${RUN_ARGS:-}"

if [[ -z "${ENGINE:-}" ]]; then
    if docker info > /dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
if [[ $ENGINE == podman ]]; then
    E=(podman --storage-driver vfs ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
    BUILD=("${E[@]}" build --format docker --isolation chroot --network host)
else
    E=("$ENGINE")
    BUILD=("$ENGINE" build)
fi

now() { date +%s.%N; }
took() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }
names=()
cleanup() { for n in "${names[@]}"; do "${E[@]}" rm -f "$n" > /dev/null 2>&1 || true; done; }
trap cleanup EXIT

if [[ ${DEBOOTSTRAP_BASE:-0} == 1 ]]; then
    t=$(now)
    rootfs=$(mktemp -d)
    chmod 755 "$rootfs"  # it becomes the image's /, which the unprivileged user must traverse
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian > "$rootfs.log" 2>&1
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${E[@]}" import - localhost/torpor-cpu-base:bookworm > /dev/null
    rm -rf "$rootfs" "$rootfs.log"
    BASE_IMAGE=localhost/torpor-cpu-base:bookworm
    echo "base image (debootstrap): $(took "$t")"
fi

t=$(now)
log=$(mktemp --suffix=.image-build.log)
"${BUILD[@]}" ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} "${BUILD_EXTRA[@]}" -t "$IMAGE" . > "$log" 2>&1 \
    || { tail -40 "$log"; echo "FAIL: build ($log)"; exit 1; }
echo "build: $(took "$t") (log: $log)"

# ready: what `docker run` of the README gives, answering on the host's port
wait_ready() {
    for _ in $(seq 600); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -m 3 "localhost:$1/v2/health/ready") == 200 ]] && return 0
        sleep 0.5
    done
    return 1
}
# the image's own HEALTHCHECK command, run in the container (docker runs it only every 15 s)
healthcheck() {
    local argv
    mapfile -t argv < <("${E[@]}" inspect --format '{{json .Config.Healthcheck.Test}}' "$1" \
        | python3 -c "import json, sys; print('\n'.join(json.load(sys.stdin)[1:]))")
    "${E[@]}" exec "$1" "${argv[@]}"
}

name=torpor-image-check-$$
names+=("$name")
t=$(now)
"${E[@]}" run -d --name "$name" "${RUN_EXTRA[@]}" -p "$PORT-$((PORT + 2)):8000-8002" "$IMAGE" --devices "$DEVICES" > /dev/null
wait_ready "$PORT" || { "${E[@]}" logs "$name" | tail -40; echo "FAIL: not ready"; exit 1; }
echo "run -> ready (bundled examples): $(took "$t")"
models=$(curl -s -X POST -d '{"ready": true}' "localhost:$PORT/v2/repository/index" \
    | python3 -c "import json, sys; print(len(json.load(sys.stdin)))")
echo "models ready: $models"
answer=$(curl -s "localhost:$PORT/v2/models/simple/infer" -d '{"inputs": [
    {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]},
    {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}]}')
python3 -c "import json, sys; out = {o['name']: o['data'] for o in json.loads(sys.argv[1])['outputs']}; \
assert out['OUTPUT0'] == list(range(1, 17)) and out['OUTPUT1'] == list(range(-1, 15)), out" "$answer" \
    || { echo "FAIL: inference answered $answer"; exit 1; }
echo "inference on simple: ok"
healthcheck "$name" || { echo "FAIL: the health check fails on the bundled examples"; exit 1; }
echo "health check (bundled examples): passes"

empty=$(mktemp -d)
chmod 755 "$empty"
name=torpor-image-check-empty-$$
names+=("$name")
"${E[@]}" run -d --name "$name" "${RUN_EXTRA[@]}" -p "$((PORT + 10)):8000" -v "$empty:/models" "$IMAGE" --devices "$DEVICES" > /dev/null
wait_ready $((PORT + 10)) || { "${E[@]}" logs "$name" | tail -40; echo "FAIL: empty repository: not ready"; exit 1; }
if healthcheck "$name"; then
    echo "FAIL: the health check passes with an empty repository"
    exit 1
fi
echo "health check (empty repository at /models): fails, as it should"
rmdir "$empty"
echo "PASS"
