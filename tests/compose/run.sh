#!/usr/bin/env bash
# `make compose-test`: the docker-compose.yml, unchanged, on this machine (no Docker engine, no Docker Hub)
# through the compose kit (podman + podman-compose + a local python:3.11-slim), see ../shared/compose.
#
#   set up the kit -> build the image -> `compose up -d` -> wait for /health through the published port
#   -> tests/compose/compose_check.py (chat with an image via `openai`; kill -9 llm, then vision, each
#      under 32 streams + 8 plain requests: every request ends, reported per outcome; 503 and /health
#      naming the service while down; healed within 30 s)
#   -> `compose stop` (every service must exit 0 on SIGTERM, well inside stop_grace_period)
#   -> `compose down -v` -> `LLM_REPLICAS=2 VISION_REPLICAS=2 compose up -d` (podman-compose 1.6 takes one
#   --scale flag only): tests/compose/scale_check.py -> `compose down -v`,
#   and check that nothing of the project is left. COMPOSE_TEST_SCALE=0 skips the --scale step.
#
# Env: PY (python with openai+httpx+pillow, default .venv/bin/python), COMPOSE_KIT (kit folder),
# COMPOSE_TEST_PROJECT (default mmserve-test), COMPOSE_TEST_PORT (default: a free port).
set -euo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
log() { printf '[compose-test %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

PY=${PY:-.venv/bin/python}
# The kit: $COMPOSE_KIT, else next to the project (../shared/compose), else where this workplace keeps it.
KIT_DIR=${COMPOSE_KIT:-}
if [ -z "$KIT_DIR" ]; then
  for candidate in "$(cd .. && pwd)/shared/compose" /work/shared/compose /opt/compose-kit; do
    if [ -x "$candidate/setup-podman.sh" ]; then KIT_DIR=$candidate; break; fi
  done
fi
[ -n "$KIT_DIR" ] || { echo "compose kit not found: set COMPOSE_KIT to the folder holding setup-podman.sh" >&2; exit 1; }
PROJECT=${COMPOSE_TEST_PROJECT:-mmserve-test}
PORT=${COMPOSE_TEST_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PORT
unset MODEL_DIR CHECKPOINT_PATH MODEL_TYPE TOKENIZER_PATH MODEL_NAME API_KEY MMSERVE_IMAGE  # the defaults
# The image's default torch index (PyTorch's CPU wheels) is out of reach here: the kit's pip finds the same
# torch 2.13.0+cpu wheel in its /opt/wheels find-links folder, so only PyPI is named.
export TORCH_INDEX_URL=https://pypi.org/simple

# 1. the kit (idempotent: ~1 s when done; its own smoke test is skipped, this test covers more)
if [ "$(id -u)" = 0 ]; then SETUP=(); else SETUP=(sudo -E); fi
SKIP_SMOKE=1 "${SETUP[@]}" "$KIT_DIR/setup-podman.sh"

# Service names must resolve between containers. The kit installs podman with --no-install-recommends,
# which leaves podman 4.3 on CNI without the dnsname plugin (names don't resolve, the kit's own smoke
# test fails). Switch to netavark + aardvark-dns (what the kit was tested with) while nothing exists yet.
if [ "$(podman info --format '{{.Host.NetworkBackend}}')" != netavark ]; then
  log "podman uses CNI without DNS: installing netavark + aardvark-dns"
  [ -z "$(podman ps -aq)" ] || { echo "containers exist; cannot switch the network backend" >&2; exit 1; }
  "${SETUP[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    netavark aardvark-dns >/dev/null
  printf netavark | "${SETUP[@]}" tee /var/lib/containers/storage/defaultNetworkBackend >/dev/null
  # a CNI bridge left behind on the same subnet (10.88/16) steals the containers' return traffic
  if ip link show cni-podman0 >/dev/null 2>&1; then "${SETUP[@]}" ip link delete cni-podman0; fi
  [ "$(podman info --format '{{.Host.NetworkBackend}}')" = netavark ]
fi

COMPOSE=(compose -p "$PROJECT")
wait_healthy() {
  local code=""
  for _ in $(seq 1 240); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" || true)
    [ "$code" = 200 ] && return 0
    sleep 1
  done
  log "gateway /health never became 200 (last: $code)"; return 1
}
# `down`, plus what podman-compose's down misses: replicas added with --scale (it removes <svc>_1 only)
purge() {
  "${COMPOSE[@]}" down -v -t 1 >/dev/null 2>&1 || true
  local ids
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    podman rm -f -t 1 $ids >/dev/null 2>&1 || true
    "${COMPOSE[@]}" down -v -t 1 >/dev/null 2>&1 || true
    podman volume rm -f "${PROJECT}_models" "${PROJECT}_internal-token" "${PROJECT}_compile-cache" >/dev/null 2>&1 || true
  fi
}
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    log "FAILED (rc=$rc); logs:"
    for s in internal-token model-init vision llm gateway; do
      echo "----- $s"; podman logs --tail 40 "${PROJECT}_${s}_1" 2>&1 || true
    done
  fi
  purge
  exit "$rc"
}
trap cleanup EXIT
purge   # leftovers of an interrupted run

# 2. build (layer cache: only the source layers rebuild after a code change)
log "build"
t=$(date +%s)
"${COMPOSE[@]}" build >/tmp/mmserve-compose-build.log 2>&1 || { tail -40 /tmp/mmserve-compose-build.log; exit 1; }
log "build took $(( $(date +%s) - t ))s"

# 3. up: model-init builds the demo checkpoint, vision and llm until their gRPC health is SERVING,
# then the gateway (depends_on: service_healthy)
log "up -d (gateway on 127.0.0.1:$PORT)"
t=$(date +%s)
"${COMPOSE[@]}" up -d >/tmp/mmserve-compose-up.log 2>&1 || { tail -40 /tmp/mmserve-compose-up.log; exit 1; }
wait_healthy
podman healthcheck run "${PROJECT}_gateway_1" >/dev/null   # the compose healthcheck itself passes
log "healthy after $(( $(date +%s) - t ))s: $(curl -s "http://127.0.0.1:$PORT/health")"
for s in vision llm; do
  if podman port "${PROJECT}_${s}_1" 2>/dev/null | grep -q .; then log "$s publishes a port"; exit 1; fi
done

# 4. the requests, the kill and the recovery
"$PY" tests/compose/compose_check.py --port "$PORT" --project "$PROJECT"

# 5. SIGTERM with a request in flight: every service drains (DRAIN_TIMEOUT, 30 s) and exits 0 inside
# its stop_grace_period (40 s) - the request completes (drained, not cut) and nobody waits out the kill
curl -s -o /dev/null -m 60 -w 'in-flight request during stop: HTTP %{http_code} after %{time_total}s\n' \
  "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "hello", "max_tokens": 600, "ignore_eos": true}' >/tmp/mmserve-compose-inflight.log 2>&1 &
inflight=$!
sleep 1
t=$EPOCHREALTIME
"${COMPOSE[@]}" stop >/dev/null 2>&1
took=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
wait "$inflight" || true
log "$(cat /tmp/mmserve-compose-inflight.log)"
codes=""
for s in gateway llm vision; do
  codes="$codes $s=$(podman inspect --format '{{.State.ExitCode}}' "${PROJECT}_${s}_1")"
done
log "compose stop took ${took}s; exit codes:$codes"
[ "$codes" = " gateway=0 llm=0 vision=0" ] || { log "a service did not exit cleanly on SIGTERM"; exit 1; }
grep -q "HTTP 200" /tmp/mmserve-compose-inflight.log || { log "the in-flight request was not drained to completion"; exit 1; }
awk -v x="$took" 'BEGIN{exit !(x < 40)}' || { log "stop took ${took}s (>= 40 s: somebody waited out the kill timeout)"; exit 1; }

"${COMPOSE[@]}" down -v >/dev/null 2>&1

# 6. two LLM and two vision replicas: the gateway routes over every replica the names resolve to
if [ "${COMPOSE_TEST_SCALE:-1}" = 1 ]; then
  t=$(date +%s)
  LLM_REPLICAS=2 VISION_REPLICAS=2 "${COMPOSE[@]}" up -d >/tmp/mmserve-compose-up.log 2>&1 || { tail -40 /tmp/mmserve-compose-up.log; exit 1; }
  wait_healthy
  "$PY" tests/compose/scale_check.py --port "$PORT" --project "$PROJECT"
  log "LLM_REPLICAS=2 VISION_REPLICAS=2: both of each served, cache-aware routing hit, one LLM replica killed under load ($(( $(date +%s) - t ))s)"
  purge
fi

# 7. nothing left behind
left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
[ -z "$left" ] || { log "containers left: $left"; exit 1; }
! podman volume exists "${PROJECT}_models" || { log "volume left"; exit 1; }
! podman volume exists "${PROJECT}_internal-token" || { log "internal-token volume left"; exit 1; }
! curl -s -o /dev/null "http://127.0.0.1:$PORT/health" || { log "port $PORT still answers"; exit 1; }
trap - EXIT
log "PASSED in $(( $(date +%s) - T0 ))s"
