#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, service tests and the end-to-end tests, whose
# fixtures are written by numpy and zarr-python (installed here into .venv, so a fresh machine
# needs only Rust and Python 3), then the libtorch tests of trainer-client's `torch` feature
# (PyTorch 2.13.0 from PyPI, about 5 GB; CONVEYOR_SKIP_TORCH=1 skips them, saying so), then the
# `conveyor` Python package's pytest suite (its wheel built by maturin and installed into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
export CONVEYOR_PYTHON="$PWD/.venv/bin/python"

# The crates' layering (ARCHITECTURE.md): no import circles, the loader's wings import downwards.
python3 scripts/check-layers.py
# Every link of the README, the guide in docs/ and the other Markdown pages resolves.
python3 scripts/check-docs.py

# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked

# nginx with WebDAV listings serves the http:// datasets of the object-storage tests (Debian's
# packages; moto's S3 server comes from tests/requirements.txt).
if [ ! -e /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ] || ! command -v nginx >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q nginx libnginx-mod-http-dav-ext
fi

# The Python package as users install it: the wheel with the loader and trainer binaries
# (scripts/build-wheel.sh). Its tests start the debug loader above; test_wheel.py installs the
# wheel alone into a fresh environment.
wheel="$(bash scripts/build-wheel.sh)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
python_tests() {
    CONVEYOR_BIN_DIR="$PWD/target/debug" CONVEYOR_WHEEL="$wheel" .venv/bin/python -m pytest -q python/tests "$@"
}

if [ "${CONVEYOR_SKIP_TORCH:-0}" = "1" ]; then
    echo "SKIPPED: torch feature tests and the Python package's torch tests (CONVEYOR_SKIP_TORCH=1)"
    python_tests -rs
    exit 0
fi
# The torch tests start a loader-server from the same target directory (built above).
bash scripts/setup-torch.sh cargo test --locked -p trainer-client --features torch
# torchdata's StatefulDataLoader, for the test of its state protocol (needs the torch above).
.venv/bin/python -m pip install --quiet --disable-pip-version-check torchdata==0.11.0
python_tests
