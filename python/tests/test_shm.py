"""The same-host path from Python: loaders on Unix sockets (``unix:PATH``) whose batches travel
through shared memory, against real loader processes (failover over it: test_streaming.py)."""

import gc

import numpy as np

import conveyor
from conftest import free_port, metric, metrics, write_chess_like, write_dtypes


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
