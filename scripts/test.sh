#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, service tests and the end-to-end tests, whose
# fixtures are written by numpy (installed here into .venv, so a fresh machine needs only Rust
# and Python 3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
export CONVEYOR_PYTHON="$PWD/.venv/bin/python"

# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked
