#!/usr/bin/env bash
# Where the time goes when one loader streams a dataset to one client on this machine: a
# system-wide perf profile (both processes and the kernel) of `trainer-client stream --tensors`.
#   bash bench/profile.sh DATASET_NAME DATASET_DIR [BATCHES [STREAM FLAGS...]]
#   e.g. bash bench/profile.sh images bench/out/data/images 1500
#        bash bench/profile.sh eeg bench/out/data/eeg.zarr 200 --shuffle block --shuffle-window 8
# (after bench/suite.py made the data)
# PROFILE_TRANSPORT=shm profiles the same-host path instead: the client reaches the loader's
# --listen-unix socket and batches travel through shared memory.
# Writes bench/out/profile-NAME.txt: time per process, per shared object, and the top symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 dir=$2 batches=${3:-1500}
shift $(($# < 3 ? $# : 3))
out=bench/out; mkdir -p "$out"
bin=target/release
log=$(mktemp); trap 'kill "$loader" 2>/dev/null || true; rm -f "$log"' EXIT
unix_args=()
socket="$out/profile-loader.sock"
if [ "${PROFILE_TRANSPORT:-tcp}" = shm ]; then unix_args=(--listen-unix "$socket"); fi
"$bin/loader-server" --listen 127.0.0.1:0 "${unix_args[@]}" --dataset "$name=$dir" >"$log" &
loader=$!
for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
addr=$(awk '/listening on/ {print $3; exit}' "$log")
if [ "${PROFILE_TRANSPORT:-tcp}" = shm ]; then addr="unix:$socket"; fi
# Warm the page cache for the pages this run touches (same seed), so the profile shows the
# steady state rather than disk reads.
"$bin/trainer-client" stream --loader "$addr" --dataset "$name" --max-batches "$batches" --seed 7 "$@" >/dev/null
perf record -a -g -F 999 -o "$out/perf-$name.data" -- \
    "$bin/trainer-client" stream --loader "$addr" --dataset "$name" --max-batches "$batches" --seed 7 --tensors "$@" \
    2>/dev/null | tee "$out/profile-$name.txt"
report() {  # perf report rows only, at most $1 of them
    local rows=$1; shift
    perf report -i "$out/perf-$name.data" --no-children --stdio -g none "$@" 2>/dev/null | grep -E '^ +[0-9]' \
        | awk -v n="$rows" 'NR <= n'
}
{
    echo "== share of CPU samples per thread name (loader: loader-server's runtime and gather threads;"
    echo "   trainer: trainer-client's runtime; trainer-client: its main thread and libtorch's threads)"
    report 12 --sort comm
    echo "== per thread name and shared object"
    report 20 --sort comm,dso
    echo "== top symbols"
    report 40 --sort comm,sym
} >>"$out/profile-$name.txt"
cat "$out/profile-$name.txt"
