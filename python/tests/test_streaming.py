"""The conveyor package against real loader processes and datasets written by numpy."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import conveyor
from conftest import binary, free_port, interrupt_when_blocked, metric, metrics, write_chess_like, write_dtypes


def epoch_indices(ds):
    return np.concatenate([batch["__index__"] for batch in ds])


def test_every_dtype_round_trips_bit_exactly_into_numpy(tmp_path, start_loader):
    fields = write_dtypes(tmp_path / "d")
    loader = start_loader({"d": tmp_path / "d"})
    info = conveyor.datasets([loader.addr])["d"]
    assert info.num_samples == 53 and len(info.fields) == len(fields)
    ds = conveyor.StreamingDataset([loader.addr], "d", batch_size=7, shuffle="full", seed=3)
    assert len(ds) == 8
    rows = 0
    for batch in ds:
        index = batch["__index__"]
        assert index.dtype == np.int64
        for name, source in fields.items():
            got, want = batch[name], source[index]
            assert got.dtype == want.dtype.newbyteorder("<") or got.dtype == want.dtype, (name, got.dtype)
            assert got.shape == want.shape, name
            assert got.tobytes() == want.astype(got.dtype).tobytes(), name
        rows += len(index)
    assert rows == 53


def test_the_order_is_the_command_lines_for_the_same_settings(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 5000)
    loader = start_loader({"c": tmp_path / "c"})
    dump = tmp_path / "dump"
    subprocess.run([binary("trainer-client"), "stream", "--loader", loader.addr, "--dataset", "c", "--batch-size", "64",
                    "--seed", "9", "--epoch", "2", "--dump", str(dump)], check=True, capture_output=True)
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=64, seed=9)
    ds.set_epoch(2)
    assert np.array_equal(epoch_indices(ds), np.load(dump / "__indices__.npy"))


def test_epochs_are_exactly_once_and_ranks_split_them_disjointly(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 1001)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=50, seed=1)
    first = epoch_indices(ds)
    second = epoch_indices(ds)  # no set_epoch: the next epoch
    assert sorted(first) == list(range(1001)) and sorted(second) == list(range(1001))
    assert not np.array_equal(first, second)
    def rank(r, drop_last):
        return epoch_indices(conveyor.StreamingDataset([loader.addr], "c", batch_size=50, seed=1, rank=r,
                                                       world_size=2, drop_last=drop_last))

    dropped = [rank(0, True), rank(1, True)]
    assert len(dropped[0]) == len(dropped[1]) == 500 and not set(dropped[0]) & set(dropped[1])
    # Without drop_last the epoch is padded by wrapping, as DistributedSampler does: 501 each,
    # one sample twice, the union the whole epoch.
    padded = [rank(0, False), rank(1, False)]
    assert len(padded[0]) == len(padded[1]) == 501
    assert len(set(padded[0]) | set(padded[1])) == 1001 and len(set(padded[0]) & set(padded[1])) == 1


def test_a_state_dict_taken_mid_epoch_resumes_in_a_fresh_process(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 3000)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=100, seed=5)
    ds.set_epoch(4)
    full = epoch_indices(ds)
    ds.set_epoch(4)
    taken = []
    for i, batch in enumerate(ds):
        taken.append(batch["__index__"])
        if i == 11:
            state = ds.state_dict()
            break
    state_path = tmp_path / "state.json"
    state_path.write_text(json.dumps(state))
    script = textwrap.dedent(f"""
        import json, numpy as np, conveyor
        ds = conveyor.StreamingDataset([{loader.addr!r}], "c", batch_size=100, seed=5)
        ds.load_state_dict(json.load(open({str(state_path)!r})))
        np.save({str(tmp_path / 'rest.npy')!r}, np.concatenate([b["__index__"] for b in ds]))
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    rest = np.load(tmp_path / "rest.npy")
    assert np.array_equal(np.concatenate(taken + [rest]), full), "the rest of the epoch exactly, nothing twice"
    other = conveyor.StreamingDataset([loader.addr], "c", batch_size=50, seed=5)
    with pytest.raises(conveyor.InvalidSettingsError, match="batch_size=100"):
        other.load_state_dict(state)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_loader_killed_mid_epoch_loses_and_repeats_nothing(tmp_path, start_loader, transport):
    """Over TCP, and over Unix sockets with shared memory (test_shm.py has the rest of that path)."""
    write_chess_like(tmp_path / "c", 20000)
    sockets = {"a": None, "b": None} if transport == "tcp" else {n: tmp_path / f"{n}.sock" for n in "ab"}
    a = start_loader({"c": tmp_path / "c"}, unix_socket=sockets["a"])
    b = start_loader({"c": tmp_path / "c"}, unix_socket=sockets["b"])
    ds = conveyor.StreamingDataset([a.client_addr, b.client_addr], "c", batch_size=100, seed=2, request_timeout=5.0)
    seen = []
    for i, batch in enumerate(ds):
        assert np.array_equal(batch["label"], batch["__index__"] * 3), "content matches the indices"
        seen.append(batch["__index__"])
        if i == 30:
            a.kill()
    seen = np.concatenate(seen)
    assert len(seen) == 20000 and len(np.unique(seen)) == 20000
    stats = ds.stats()
    assert stats["samples"] == 20000 and stats["replicas"][a.client_addr]["failures"] >= 1, stats
    assert stats["replicas"][b.client_addr]["batches"] > 0, stats
    # Retries depend on whether the killed loader had requests in flight at that moment.
    assert stats["samples_per_s"] > 0 and stats["retried_batches"] <= 8, stats


def test_bad_arguments_and_unreachable_loaders_raise_promptly(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 100)
    loader = start_loader({"c": tmp_path / "c"})
    with pytest.raises(conveyor.UnknownDatasetError, match="the loaders serve: c"):
        conveyor.StreamingDataset([loader.addr], "nope")
    with pytest.raises(conveyor.InvalidSettingsError, match="shuffle='random'"):
        conveyor.StreamingDataset([loader.addr], "c", shuffle="random")
    with pytest.raises(conveyor.InvalidSettingsError, match="batch_size=0"):
        conveyor.StreamingDataset([loader.addr], "c", batch_size=0)
    with pytest.raises(conveyor.InvalidSettingsError, match="rank 3 is not below world_size 2"):
        conveyor.StreamingDataset([loader.addr], "c", rank=3, world_size=2)
    with pytest.raises(conveyor.InvalidSettingsError, match="loaders="):
        conveyor.StreamingDataset(loader.addr, "c")
    with pytest.raises(conveyor.InvalidSettingsError, match="host:port"):
        conveyor.StreamingDataset(["no-port"], "c")
    started = time.monotonic()
    with pytest.raises(conveyor.LoaderUnavailableError, match="127.0.0.1:1"):
        conveyor.StreamingDataset(["127.0.0.1:1"], "c", unavailable_timeout=1.0)
    assert time.monotonic() - started < 5
    assert issubclass(conveyor.LoaderUnavailableError, conveyor.ConveyorError)


def test_ctrl_c_interrupts_a_waiting_iteration(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 2000)
    loader = start_loader({"c": tmp_path / "c"})
    script = textwrap.dedent(f"""
        import sys, traceback, conveyor
        ds = conveyor.StreamingDataset([{loader.addr!r}], "c", batch_size=10, request_timeout=600)
        print("connected", flush=True)
        sys.stdin.readline()  # the loader is stopped now: no batch will come
        print("waiting", flush=True)
        try:
            next(iter(ds))
        except KeyboardInterrupt:
            print("interrupted in", traceback.extract_tb(sys.exc_info()[2])[-1].line, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "connected"
    loader.proc.send_signal(signal.SIGSTOP)
    try:
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "waiting"
        sent = interrupt_when_blocked(child, "a batch")
        out, _ = child.communicate(timeout=10)
        assert "interrupted in batch = client.next()" in out, out
        assert time.monotonic() - sent < 2, "Ctrl-C took too long"
    finally:
        loader.proc.send_signal(signal.SIGCONT)


def test_torch_tensors_hold_the_same_bytes_widened_where_torch_lacks_the_type(tmp_path, start_loader):
    torch = pytest.importorskip("torch")
    fields = write_dtypes(tmp_path / "d")
    loader = start_loader({"d": tmp_path / "d"})
    with pytest.raises(conveyor.BatchError, match="'f_uint64' is uint64"):
        next(iter(conveyor.StreamingDataset([loader.addr], "d", batch_size=9, output="torch")))
    os.remove(tmp_path / "d" / "f_uint64.npy")
    del fields["f_uint64"]
    loader = start_loader({"d": tmp_path / "d"})
    ds = conveyor.StreamingDataset([loader.addr], "d", batch_size=9, output="torch", seed=4)
    widened = {np.dtype("uint16"): torch.int32, np.dtype("uint32"): torch.int64, np.dtype(">u4"): torch.int64}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PyTorch's warning about non-writable arrays
        rows = 0
        for batch in ds:
            index = batch["__index__"].numpy()
            rows += len(index)
            for name, source in fields.items():
                got, want = batch[name], source[index]
                assert isinstance(got, torch.Tensor) and got.device.type == "cpu", name
                if want.dtype in widened:
                    assert got.dtype == widened[want.dtype], name
                    assert np.array_equal(got.numpy(), want.astype(np.int64)), name
                else:
                    assert got.numpy().tobytes() == want.astype(want.dtype.newbyteorder("<")).tobytes(), name
    assert rows == 53


def test_dataloader_workers_give_the_same_sequence_as_direct_iteration(tmp_path, start_loader):
    torch = pytest.importorskip("torch")
    write_chess_like(tmp_path / "c", 4000)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=64, seed=8, output="torch")
    ds.set_epoch(1)
    direct = [b["__index__"].numpy() for b in ds]
    ds.set_epoch(1)
    loader_batches = [b["__index__"].numpy() for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(loader_batches) == len(direct) == len(ds)
    assert np.array_equal(np.concatenate(loader_batches), np.concatenate(direct))


def test_streaming_a_large_dataset_keeps_memory_bounded(tmp_path, start_loader):
    # 2 GiB of boards: the process's RSS grows by about (prefetch + 2) batches, not the dataset.
    n = 2 * 1024**3 // 1536
    write_chess_like(tmp_path / "c", n)
    loader = start_loader({"c": tmp_path / "c"})
    script = textwrap.dedent(f"""
        import resource, conveyor
        ds = conveyor.StreamingDataset([{loader.addr!r}], "c", batch_size=256, prefetch=8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = sum(len(b["__index__"]) for b in ds)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(rows, (after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    rows, growth = int(out[0]), int(out[1])
    batch_bytes = 256 * (1536 + 8)
    assert rows == n
    assert growth < 10 * batch_bytes + 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"


def test_the_loaders_retained_allocator_memory_is_bounded_by_its_flag(tmp_path, start_loader):
    # The loader binary's allocator keeps freed batch buffers for reuse up to
    # --allocator-retain-bytes; at 0 every check (each 100 ms) gives them back.
    write_chess_like(tmp_path / "c", 40_000)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader_addr = start_loader({"c": tmp_path / "c"}, "--metrics-listen", metrics_addr,
                               "--allocator-retain-bytes", "0").addr
    deadline = time.monotonic() + 30
    while True:
        # 60 MB of 6 MB batches per pass; the bound is checked while and after they stream.
        rows = sum(len(b["__index__"]) for b in conveyor.StreamingDataset([loader_addr], "c", batch_size=4000))
        assert rows == 40_000
        text = metrics(metrics_addr)
        if metric(text, "conveyor_loader_allocator_purges_total") >= 1:
            break
        assert time.monotonic() < deadline, f"no purge within 30 s at --allocator-retain-bytes 0:\n{text}"
    assert metric(text, "conveyor_loader_allocator_bytes", state="allocated") > 0


def test_torchdatas_stateful_dataloader_resumes_with_workers(tmp_path, start_loader):
    pytest.importorskip("torch")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    write_chess_like(tmp_path / "c", 3000)
    loader = start_loader({"c": tmp_path / "c"})

    def make():
        ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=50, seed=6, output="torch")
        return stateful.StatefulDataLoader(ds, batch_size=None, num_workers=2)

    full = [b["__index__"].numpy() for b in make()]
    assert len(full) == 60
    first = make()
    taken = []
    for i, batch in enumerate(first):
        taken.append(batch["__index__"].numpy())
        if i == 24:
            state = first.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["__index__"].numpy() for b in resumed]
    assert np.array_equal(np.concatenate(taken + rest), np.concatenate(full)), "the rest exactly, nothing twice"


def test_idle_connections_from_one_host_cannot_take_the_metrics_endpoint_from_a_scraper(tmp_path, start_loader):
    import http.client
    import socket
    write_chess_like(tmp_path / "c", 100)
    metrics_addr = f"127.0.0.1:{free_port()}"
    start_loader({"c": tmp_path / "c"}, "--metrics-listen", metrics_addr)
    host, port = metrics_addr.rsplit(":", 1)
    # 20 connections from 127.0.0.1 that never send a request (more than the endpoint's 16 slots).
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]
    try:
        # A scraper on another address (127.0.0.2 is loopback too) is answered at once.
        scraper = http.client.HTTPConnection(host, int(port), timeout=3, source_address=("127.0.0.2", 0))
        started = time.monotonic()
        scraper.request("GET", "/metrics")
        body = scraper.getresponse().read().decode()
        assert "conveyor_loader_max_streams" in body and time.monotonic() - started < 2
    finally:
        for connection in idle:
            connection.close()
