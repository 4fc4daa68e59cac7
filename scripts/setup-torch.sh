#!/usr/bin/env bash
# Prepares a build of trainer-client with the `torch` feature: a virtual environment (.venv)
# with PyTorch 2.13.0 from PyPI (the version tch 0.26 expects), whose libtorch the build links.
# Source it, or run a command after it:
#   bash scripts/setup-torch.sh cargo build --release -p trainer-client --features torch
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "installing torch==2.13.0 into .venv: about 5 GB of wheels (CUDA libraries included), a few minutes" >&2
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on torch==2.13.0
fi
# torch-sys finds libtorch through this Python; the trainer-client build script then bakes its
# directory into the binary's rpath, so no LD_LIBRARY_PATH is needed to run it.
export LIBTORCH_USE_PYTORCH=1
export PATH="$PWD/.venv/bin:$PATH"
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
