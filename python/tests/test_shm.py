"""The same-host path from Python: loaders on Unix sockets (``unix:PATH``) whose batches travel
through shared memory, against real loader processes (failover over it: test_streaming.py)."""

import gc
import os
import subprocess

import numpy as np
import pytest

import conveyor
from conftest import binary, free_port, metric, metrics, write_chess_like, write_dtypes


def unix_loader(start_loader, tmp_path, datasets, name):
    loader = start_loader(datasets, unix_socket=tmp_path / f"{name}.sock")
    return loader, loader.client_addr


def test_every_dtype_arrives_bit_exactly_through_shared_memory_and_outlives_the_client(tmp_path, start_loader):
    fields = write_dtypes(tmp_path / "d")
    _, addr = unix_loader(start_loader, tmp_path, {"d": tmp_path / "d"}, "a")
    ds = conveyor.StreamingDataset([addr], "d", batch_size=7, shuffle="full", seed=3)
    held, rows = [], 0
    for batch in ds:
        index = batch["__index__"]
        for name, source in fields.items():
            got, want = batch[name], source[index]
            assert got.shape == want.shape, name
            assert got.tobytes() == want.astype(got.dtype).tobytes(), name
        rows += len(index)
        held.append(batch)
    assert rows == 53
    # The arrays are views of the region; it stays mapped for them after the client is gone.
    del ds
    gc.collect()
    for batch in held:
        index = batch["__index__"]
        for name, source in fields.items():
            assert batch[name].tobytes() == source[index].astype(batch[name].dtype).tobytes(), name


def test_the_same_order_over_tcp_unix_and_a_tcp_address_detected_as_this_host(tmp_path, start_loader, monkeypatch):
    write_chess_like(tmp_path / "c", 3000)
    metrics_addr = f"127.0.0.1:{free_port()}"
    tcp = start_loader({"c": tmp_path / "c"}, "--metrics-listen", metrics_addr, unix_socket=tmp_path / "a.sock")
    addr = tcp.client_addr

    def epoch(loader_addr):
        ds = conveyor.StreamingDataset([loader_addr], "c", batch_size=128, seed=9)
        return [(b["__index__"].copy(), b["label"].copy()) for b in ds]

    def shared_batches():
        return metric(metrics(metrics_addr), "conveyor_loader_shm_batches_total", path="shared")

    # The loader's TCP address: the client finds the loader's socket on this host and streams
    # through shared memory (every batch of the epoch, 24 of 128 rows).
    detected = epoch(tcp.addr)
    assert shared_batches() == 24
    shared = epoch(addr)
    assert shared_batches() == 48
    monkeypatch.setenv("CONVEYOR_SHM", "0")
    reference = epoch(tcp.addr)
    plain = epoch(addr)
    assert shared_batches() == 48, "CONVEYOR_SHM=0: plain gRPC over TCP and the socket"
    for other in (detected, shared, plain):
        assert len(other) == len(reference)
        for (i, x), (j, y) in zip(reference, other):
            assert np.array_equal(i, j) and np.array_equal(x, y)


def test_shared_memory_of_all_connections_stays_within_max_shm_bytes(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 3000)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"c": tmp_path / "c"}, "--shm-bytes", 16 << 20, "--max-shm-bytes", 40 << 20,
                          "--metrics-listen", metrics_addr, unix_socket=tmp_path / "l.sock")
    clients = [conveyor.StreamingDataset([loader.client_addr], "c", batch_size=100, seed=i) for i in range(3)]
    text = metrics(metrics_addr)
    # Two 16 MiB regions fit under 40 MiB; the third connection gets none and goes inline.
    assert metric(text, "conveyor_loader_shm_regions_total") == 2, text
    assert metric(text, "conveyor_loader_shm_regions_refused_total") == 1, text
    assert metric(text, "conveyor_loader_shm_bytes") == 32 << 20, text
    for ds in clients:
        seen = np.concatenate([b["__index__"] for b in ds])
        assert len(seen) == 3000 and len(np.unique(seen)) == 3000
    del clients, ds
    gc.collect()


def test_the_unix_socket_serves_only_the_allowed_user_ids_and_never_runs_open_beside_credentials(
        tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 500)
    (tmp_path / "tokens").write_text("s3cret\n")
    # A loader that asks for a token must say who may use its Unix socket (no token reaches the
    # socket's shared-memory hello, and TLS does not run there).
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"c={tmp_path / 'c'}",
                             "--listen-unix", str(tmp_path / "x.sock"), "--auth-token-file", str(tmp_path / "tokens")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--unix-allow-uid" in result.stderr, result.stderr
    metrics_addr = f"127.0.0.1:{free_port()}"
    other = start_loader({"c": tmp_path / "c"}, "--auth-token-file", tmp_path / "tokens", "--unix-allow-uid",
                         os.getuid() + 1, "--metrics-listen", metrics_addr, unix_socket=tmp_path / "o.sock")
    with pytest.raises(conveyor.LoaderUnavailableError):
        conveyor.StreamingDataset([other.client_addr], "c", auth_token="s3cret", unavailable_timeout=2)
    assert metric(metrics(metrics_addr), "conveyor_loader_unix_peers_refused_total") >= 1
    mine = start_loader({"c": tmp_path / "c"}, "--auth-token-file", tmp_path / "tokens", "--unix-allow-uid",
                        f"{os.getuid() + 1},{os.getuid()}", unix_socket=tmp_path / "m.sock")
    ds = conveyor.StreamingDataset([mine.client_addr], "c", auth_token="s3cret", batch_size=100)
    assert sorted(np.concatenate([b["__index__"] for b in ds]).tolist()) == list(range(500))
    with pytest.raises(conveyor.AuthenticationError):
        conveyor.StreamingDataset([mine.client_addr], "c", auth_token="wrong", unavailable_timeout=2)
