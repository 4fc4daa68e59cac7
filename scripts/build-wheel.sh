#!/usr/bin/env bash
# Builds the `conveyor` wheel that carries the whole system: the Python package with its native
# extension, plus the loader-server and trainer-client binaries, which pip installs on PATH as
# `conveyor-loader` and `conveyor-trainer`. Installing the wheel needs no Rust toolchain.
#   bash scripts/build-wheel.sh [OUT_DIR]     (default: target/wheels; prints the wheel's path)
# Needs cargo and a Python with maturin (the project's .venv gets it). The wheel is abi3 (one
# wheel for CPython 3.9+) and tagged manylinux for the glibc of the machine that builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-target/wheels}")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import maturin' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'maturin>=1.9,<2'
fi

cargo build --release --locked -p loader-server -p trainer-client >&2
scripts_dir=python/conveyor.data/scripts
rm -rf "$scripts_dir"
mkdir -p "$scripts_dir"
# Line tables stay in target/release for profiling; the wheel's copies leave them out.
strip --strip-debug -o "$scripts_dir/conveyor-loader" target/release/loader-server
strip --strip-debug -o "$scripts_dir/conveyor-trainer" target/release/trainer-client

mkdir -p "$out" && rm -f "$out"/conveyor-*.whl
(cd python && ../.venv/bin/maturin build --release --locked --strip --out "$out" >&2)
ls "$out"/conveyor-*.whl
