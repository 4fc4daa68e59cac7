"""Fixtures: datasets written by numpy, and real loader-server processes on free ports."""

import os
import re
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The binaries the README's test command builds; CONVEYOR_BIN_DIR points elsewhere.
BIN_DIR = os.environ.get("CONVEYOR_BIN_DIR", os.path.join(ROOT, "target", "debug"))

# Every dtype the protocol carries, big-endian variants of the multi-byte ones included.
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", ">i2", ">u4", ">f8"]


def binary(name):
    path = os.path.join(BIN_DIR, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is not built; run `cargo build --workspace` first (or set CONVEYOR_BIN_DIR)")
    return path


class Loader:
    """A loader-server process on a free loopback port."""

    def __init__(self, datasets, extra_args=(), env=None):
        args = [binary("loader-server"), "--listen", "127.0.0.1:0"]
        for name, path in datasets.items():
            args += ["--dataset", f"{name}={path}"]
        args += [str(a) for a in extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, LOADER_LOG="warn", **(env or {})))
        line = self.proc.stdout.readline()
        match = re.match(r"listening on (\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"loader did not start: {line!r}")
        self.addr = match.group(1)
        self.port = int(self.addr.rsplit(":", 1)[1])

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_loader():
    started = []

    def start(datasets, *extra_args, env=None, unix_socket=None):
        """`unix_socket`: also listen there (`--listen-unix`); `client_addr` is then `unix:PATH`."""
        if unix_socket is not None:
            extra_args = (*extra_args, "--listen-unix", unix_socket)
        loader = Loader(datasets, extra_args, env)
        loader.client_addr = loader.addr if unix_socket is None else f"unix:{unix_socket}"
        started.append(loader)
        return loader

    yield start
    for loader in started:
        loader.stop()


def write_dtypes(path, n=53):
    """One field per dtype, [n, 3] samples (scalars for the first), values from a seeded RNG."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(7)
    fields = {}
    for i, name in enumerate(DTYPES):
        dtype = np.dtype(name)
        shape = (n,) if i == 0 else (n, 3)
        if dtype.kind == "b":
            values = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, size=shape, dtype=np.int64 if dtype.kind == "i" else np.uint64,
                                  endpoint=True).astype(dtype)
        else:
            values = rng.standard_normal(shape).astype(dtype)
        field = "f_" + name.replace(">", "be_")
        np.save(os.path.join(path, f"{field}.npy"), values)
        fields[field] = values
    return fields


def write_chess_like(path, n):
    """[n, 12, 8, 8] int16 boards whose values encode the sample index, and int64 labels."""
    os.makedirs(path, exist_ok=True)
    board = np.lib.format.open_memmap(os.path.join(path, "board.npy"), mode="w+", dtype=np.int16, shape=(n, 12, 8, 8))
    step = 65536
    for start in range(0, n, step):
        stop = min(n, start + step)
        board[start:stop] = (np.arange(start, stop) % 32749).astype(np.int16)[:, None, None, None]
    board.flush()
    del board
    np.save(os.path.join(path, "label.npy"), np.arange(n, dtype=np.int64) * 3)


def metrics(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} {labels} in\n{text}")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_when_blocked(child, what):
    """Sends SIGINT once `child`'s main thread sleeps (parked in a wait), returning when it was
    sent; fails naming `what` if the child never blocks within 10 s."""
    deadline = time.monotonic() + 10
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "S":
        assert time.monotonic() < deadline, f"the child never blocked waiting for {what}"
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    return sent
