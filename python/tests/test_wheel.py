"""The built wheel is the whole system: installed into a fresh virtual environment with no Rust
toolchain on PATH, it starts a loader (`conveyor-loader`) and streams an epoch from Python."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import write_chess_like


@pytest.fixture(scope="module")
def wheel():
    path = os.environ.get("CONVEYOR_WHEEL")
    if not path:
        pytest.fail("CONVEYOR_WHEEL is not set: scripts/test.sh builds the wheel (scripts/build-wheel.sh) and sets it")
    return path


def test_the_wheel_alone_serves_and_streams_an_epoch(tmp_path, wheel):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Only the new environment and the system's basic tools: no cargo, no rustc, no target/.
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_CACHE_DIR", "PIP_CACHE_DIR"):
        if variable in os.environ:
            env[variable] = os.environ[variable]
    assert shutil.which("cargo", path=env["PATH"]) is None and shutil.which("rustc", path=env["PATH"]) is None
    subprocess.run([f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
                   check=True, env=env)
    loader_bin = shutil.which("conveyor-loader", path=env["PATH"])
    assert loader_bin == f"{venv}/bin/conveyor-loader", loader_bin
    assert shutil.which("conveyor-trainer", path=env["PATH"]) == f"{venv}/bin/conveyor-trainer"

    write_chess_like(tmp_path / "c", 5000)
    loader = subprocess.Popen(["conveyor-loader", "--listen", "127.0.0.1:0", "--dataset", f"c={tmp_path / 'c'}"],
                              stdout=subprocess.PIPE, text=True, env=dict(env, LOADER_LOG="warn"), cwd=tmp_path)
    try:
        match = re.match(r"listening on (\S+)", loader.stdout.readline())
        assert match, "conveyor-loader did not start"
        script = textwrap.dedent(f"""
            import numpy as np, conveyor
            ds = conveyor.StreamingDataset([{match.group(1)!r}], "c", batch_size=128, seed=3)
            seen = []
            for batch in ds:
                assert np.array_equal(batch["label"], batch["__index__"] * 3)
                seen.append(batch["__index__"])
            seen = np.concatenate(seen)
            print(len(seen), len(np.unique(seen)), conveyor.__file__)
        """)
        streamed = subprocess.run([f"{venv}/bin/python", "-c", script], capture_output=True, text=True, env=env,
                                  cwd=tmp_path)
        assert streamed.returncode == 0, streamed.stderr[-3000:]
        out = streamed.stdout.split()
        assert out[:2] == ["5000", "5000"], out
        assert out[2].startswith(str(venv)), "the package came from the fresh environment"
        info = subprocess.run(["conveyor-trainer", "info", "--loader", match.group(1)], capture_output=True,
                              text=True, env=env, cwd=tmp_path)
        assert info.returncode == 0 and "5000" in info.stdout, info.stdout + info.stderr
    finally:
        loader.kill()
        loader.wait()
