#!/usr/bin/env bash
# Compose end-to-end test. First the README's command: `up --scale loader=2 trainer` must return
# when training ends, with the trainer's exit code. Then 3 loader replicas behind one service
# name; during the trainer's epochs datagen runs again (it must keep the live dataset), one
# loader is killed (docker kill) and the service is scaled to 4; every epoch must still deliver
# every sample exactly once, and the trainer and loaders must report per-replica and per-stream
# counts. The secure override (TLS + token from mounted secrets) trains too and refuses callers
# without the token. Then a loader replica with a tiny memory limit is OOM-killed by the kernel while
# serving, and training carries on. Cleans up with `down -v`.
# Skips, saying so, when no Docker engine or compose tool answers.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "SKIPPED: compose end-to-end test (no Docker engine answers)"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose -p conveyor-e2e)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose -p conveyor-e2e)
else
    echo "SKIPPED: compose end-to-end test (neither 'docker compose' nor 'docker-compose' is installed)"
    exit 0
fi
compose() { "${compose_cmd[@]}" "$@"; }

export CONVEYOR_DOCKERFILE=docker/Dockerfile.local CONVEYOR_SAMPLES=400000 CONVEYOR_LOADERS=3 CONVEYOR_EPOCHS=6
bash scripts/docker-local.sh
oom_container=conveyor-e2e-oom-loader
cleanup() {
    docker rm -f "$oom_container" >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

fail() { echo "FAIL: $*"; compose logs --tail 30 trainer || true; exit 1; }

# Waits (bounded) until `$1` succeeds.
wait_for() {
    local what=$1 deadline=$((SECONDS + ${2:-120}))
    until eval "$what"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for: $what"
        sleep 0.2
    done
}
healthy_loaders() {
    local n=0
    for c in $(compose ps -q loader); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$c" 2>/dev/null)" = healthy ] && n=$((n + 1))
    done
    echo "$n"
}
trainer_log() { compose logs --no-color trainer 2>/dev/null; }

echo "== the README's command returns when training ends"
CONVEYOR_EPOCHS=1 timeout 300 "${compose_cmd[@]}" up --scale loader=2 trainer >/tmp/conveyor-up.log 2>&1 \
    || { tail -30 /tmp/conveyor-up.log; fail "'up --scale loader=2 trainer' did not return 0 within 300 s"; }
grep -q "epoch 0: every sample exactly once" /tmp/conveyor-up.log || { tail -30 /tmp/conveyor-up.log; fail "no epoch check"; }
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q trainer)")" = 0 ] || fail "trainer exit code"
# The trainer reached the loaders through their sockets, with shared memory.
compose logs --no-color loader | grep "stream opened" | grep "shared_memory=true" >/dev/null \
    || { compose logs --no-color loader | tail -20; fail "the trainer's streams did not use shared memory"; }
compose down -v --remove-orphans >/dev/null 2>&1
echo "PASS: up ... trainer returned after one exactly-once epoch, through Unix sockets and shared memory"

echo "== the secure setup: TLS from mounted secrets, a token, and callers without it refused"
bash scripts/make-dev-secrets.sh >/dev/null
secure=("${compose_cmd[@]}" -f docker-compose.yml -f docker-compose.secure.yml)
CONVEYOR_EPOCHS=1 timeout 300 "${secure[@]}" up --scale loader=2 trainer >/tmp/conveyor-secure.log 2>&1 \
    || { tail -30 /tmp/conveyor-secure.log; fail "the secure setup did not train"; }
grep "epoch 0: every sample exactly once" /tmp/conveyor-secure.log >/dev/null \
    || { tail -30 /tmp/conveyor-secure.log; fail "no exactly-once epoch over TLS with a token"; }
"${secure[@]}" up -d loader
wait_for '[ "$(healthy_loaders)" -ge 2 ]'
network=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(compose ps -q loader | sed -n 1p)")
outsider() {
    docker run --rm --network "$network" -v "$PWD/deploy/secrets/ca.pem:/ca.pem:ro" "$@" \
        --entrypoint /usr/local/bin/trainer-client conveyor:local info --loader https://loader:7070 --tls-ca /ca.pem 2>&1 || true
}
outsider | tee /tmp/conveyor-outsider.log | grep "requires a token" >/dev/null \
    || { cat /tmp/conveyor-outsider.log; fail "a caller without a token was not refused"; }
outsider -e CONVEYOR_AUTH_TOKEN=not-the-token | tee /tmp/conveyor-outsider.log | grep "does not accept the token" >/dev/null \
    || { cat /tmp/conveyor-outsider.log; fail "a caller with a wrong token was not refused"; }
docker run --rm --network "$network" --entrypoint /usr/local/bin/trainer-client conveyor:local info --loader loader:7070 \
    >/tmp/conveyor-outsider.log 2>&1 && { cat /tmp/conveyor-outsider.log; fail "a plain-text caller was served"; }
compose logs --no-color loader | grep "refused an unauthenticated call" >/dev/null || fail "the loaders logged no refusal"
if compose logs --no-color loader | grep -F "$(cat deploy/secrets/token)" >/dev/null; then fail "a loader logged the token"; fi
"${secure[@]}" down -v --remove-orphans >/dev/null 2>&1
echo "PASS: secure setup: an exactly-once epoch with a token (TLS to the loaders, batches through their sockets); no token, a wrong token and plain text refused"

echo "== up: datagen and 3 loaders"
compose up -d loader
wait_for '[ "$(healthy_loaders)" -ge 3 ]'

echo "== trainer streams 6 epochs; kill a loader during epoch 1, scale to 4 during epoch 2"
compose up -d --no-deps trainer
wait_for 'trainer_log | grep "epoch 0: every sample exactly once" >/dev/null'
compose run --rm datagen >/tmp/conveyor-datagen.log 2>&1 || fail "datagen failed on existing data"
grep "already holds 400000 samples; kept" /tmp/conveyor-datagen.log >/dev/null \
    || { cat /tmp/conveyor-datagen.log; fail "datagen rewrote the dataset under live loaders"; }
victim=$(compose ps -q loader | sed -n 1p)
docker kill "$victim" >/dev/null
echo "killed loader container ${victim:0:12}"
wait_for 'trainer_log | grep "epoch 1: every sample exactly once" >/dev/null'
compose up -d --no-deps --no-recreate --scale loader=4 loader
trainer=$(compose ps -q trainer)
code=$(timeout 300 docker wait "$trainer") || fail "trainer did not finish"
[ "$code" = 0 ] || fail "trainer exited with $code"
epochs_ok=$(trainer_log | grep -c "every sample exactly once" || true)
[ "$epochs_ok" = 6 ] || fail "only $epochs_ok of 6 epochs were exactly once"
trainer_log | grep -A 8 "streamed" || true
# One line per replica address (docker may give a scaled-up replica the killed one's address);
# together they served every batch of the 6 epochs once: 6 x ceil(400000 / 256).
replicas=$(trainer_log | grep -c "  replica .* batches" || true)
[ "$replicas" -ge 3 ] || fail "the trainer reported $replicas replicas, expected at least the 3 it started with"
served=$(trainer_log | sed -n 's/.*  replica .*: \([0-9]*\) batches.*/\1/p' | awk '{s += $1} END {print s + 0}')
[ "$served" = 9378 ] || fail "the replicas' counts add up to $served batches, not 9378"
# grep reads all of the logs (no -q): with pipefail, an early exit would fail the pipeline.
compose logs --no-color loader | grep "stream opened" >/dev/null || fail "loaders logged no line when a stream opened"
# A loader notices the trainer's exit a moment after it: wait (bounded) for the line.
wait_for 'compose logs --no-color loader | grep "stream ended" | grep "batches=" >/dev/null' 30
echo "PASS: 6 epochs exactly once through a killed loader, datagen re-run and a scale-up"

# 24 MiB: one 30 MB batch is more than the replica may hold. With 40 MiB it served a single batch
# and survived (rows go straight into the wire buffer, so one batch costs about its own size).
echo "== OOM: a replica with a 24 MiB limit serving 30 MB batches is killed by the kernel"
network=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(compose ps -q loader | sed -n 1p)")
volume=$(docker volume ls -q | grep 'conveyor-e2e_data$')
docker run -d --name "$oom_container" --network "$network" --network-alias loader --memory 24m --memory-swap 24m \
    -v "$volume":/data:ro -e LOADER_DATASET=chess=/data/chess -e LOADER_MAX_BATCH_BYTES=33554432 \
    -e LOADER_MAX_INFLIGHT_BYTES=268435456 conveyor:local >/dev/null
wait_for "docker exec $oom_container /usr/local/bin/trainer-client health --loader 127.0.0.1:7070 >/dev/null 2>&1" 60
# Over TCP (the OOM replica joins the service name, not the compose loaders' socket volume) and
# without shared memory, so that the compose loaders are no faster than it and a prefetch window
# of 16 keeps a few 30 MB batches in flight on every replica, the small one included.
compose run --rm --no-deps -e TRAINER_LOADER=loader:7070 -e CONVEYOR_SHM=0 trainer stream --dataset chess \
    --batch-size 20000 --epochs 2 --prefetch 16 --check-exactly-once >/tmp/conveyor-oom-run.log 2>&1 \
    || { cat /tmp/conveyor-oom-run.log; fail "training stopped"; }
cat /tmp/conveyor-oom-run.log | grep -E "exactly once|streamed"
[ "$(grep -c 'every sample exactly once' /tmp/conveyor-oom-run.log)" = 2 ] || fail "OOM run lost or repeated samples"
oom=$(docker inspect -f '{{.State.OOMKilled}}' "$oom_container")
if [ "$oom" != true ]; then
    cat /tmp/conveyor-oom-run.log
    docker inspect -f 'state: {{json .State}}' "$oom_container"
    docker logs --tail 30 "$oom_container" 2>&1
    fail "the small loader was not OOM-killed (OOMKilled=$oom); the test proved nothing"
fi
echo "PASS: the kernel OOM-killed a loader replica and both epochs still arrived exactly once"

echo "== down -v"
docker rm -f "$oom_container" >/dev/null
compose down -v --remove-orphans
trap - EXIT
[ -z "$(docker volume ls -q | grep 'conveyor-e2e_data$' || true)" ] || fail "volume left behind"
echo "PASS: compose end-to-end"
