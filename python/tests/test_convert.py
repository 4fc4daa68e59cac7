"""conveyor-convert: HDF5 files (written by h5py) and compressed .npz archives into Zarr groups
and .npy shards that a real loader serves; bounded memory, resume after a kill, verification."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zarr

import conveyor
from conftest import DTYPES, binary

CONVERT = [sys.executable, "-m", "conveyor.convert"]


def run(*args, check=True):
    result = subprocess.run([*CONVERT, *map(str, args), "--quiet"], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    assert result.returncode != 0, result.stdout
    return result.stderr


def values(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=np.int64 if dtype.kind == "i" else np.uint64,
                            endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def write_h5(path, n=300):
    """Every dtype (big-endian ones too), chunked + gzip, contiguous, lzf, szip and shuffle, in a
    nested group; a string dataset and a scalar, which are skipped."""
    arrays = {}
    with h5py.File(path, "w") as f:
        for i, name in enumerate(DTYPES):
            data = values(name, (n, 3) if i % 2 else (n,), i)
            key = "f_" + name.replace(">", "be_")
            layout = [dict(chunks=True, compression="gzip", shuffle=True), dict(), dict(compression="lzf")][i % 3]
            f.create_dataset(key, data=data, **layout)
            arrays[key] = data
        eeg = values("float32", (n, 4, 25), 99)
        f.create_group("rec").create_dataset("eeg", data=eeg, chunks=(7, 4, 25), compression="szip")
        arrays["rec.eeg"] = eeg
        f.create_dataset("names", data=np.array([b"x"] * 4))
        f.create_dataset("rate", data=250.0)
    return arrays


def read_output(path):
    """The arrays of a converted dataset, read with the world's own readers."""
    if str(path).endswith(".zarr"):
        group = zarr.open_group(path, mode="r")
        return {name: array[:] for name, array in group.arrays()}
    out = {}
    for file in sorted(os.listdir(path)):
        field = file[:-4].rsplit("-", 1)[0] if file[:-4].rsplit("-", 1)[-1].isdigit() else file[:-4]
        out.setdefault(field, []).append(np.load(path / file))
    return {k: np.concatenate(v) for k, v in out.items()}


def same_bits(a, b):
    return a.shape == b.shape and a.astype(a.dtype.newbyteorder("<")).tobytes() == b.astype(
        b.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("out, flags", [
    ("d.zarr", ()),
    ("s.zarr", ("--chunk-samples", "16", "--shard-samples", "64")),
    ("npy", ("--shard-samples", "128", "--memory", "1MiB")),
])
def test_hdf5_converts_array_by_array_and_the_loader_serves_it_exactly_once(tmp_path, start_loader, out, flags):
    arrays = write_h5(tmp_path / "src.h5")
    summary = run(tmp_path / "src.h5", tmp_path / out, *flags)
    assert summary["verified"] and set(summary["fields"]) == set(arrays)
    assert any("/names" in s for s in summary["skipped"]) and any("/rate" in s for s in summary["skipped"])
    assert not (tmp_path / f"{out}.partial").exists()
    converted = read_output(tmp_path / out)
    assert set(converted) == set(arrays)
    for name, source in arrays.items():
        assert same_bits(converted[name], source), name

    loader = start_loader({"d": tmp_path / out})
    ds = conveyor.StreamingDataset([loader.addr], "d", batch_size=64, shuffle="block", seed=2)
    batches = list(ds)
    index = np.concatenate([b["__index__"] for b in batches])
    assert sorted(index.tolist()) == list(range(300)), "exactly once"
    got = np.concatenate([b["rec.eeg"] for b in batches])
    assert got.tobytes() == arrays["rec.eeg"][index].tobytes()


def test_a_compressed_npz_converts_to_what_the_loader_can_map(tmp_path, start_loader):
    board = values("int16", (500, 12, 8, 8), 1)
    label = values("int64", (500,), 2)
    np.savez_compressed(tmp_path / "chess.npz", board=board, label=label)
    run(tmp_path / "chess.npz", tmp_path / "chess.zarr", "--memory", "2MiB")
    converted = read_output(tmp_path / "chess.zarr")
    assert same_bits(converted["board"], board) and same_bits(converted["label"], label)
    run(tmp_path / "chess.npz", tmp_path / "chess_npy", "--fields", "board")
    assert set(read_output(tmp_path / "chess_npy")) == {"board"}
    loader = start_loader({"c": tmp_path / "chess.zarr"})
    assert conveyor.datasets([loader.addr])["c"].num_samples == 500


def test_mistakes_are_named(tmp_path):
    write_h5(tmp_path / "src.h5", n=50)
    with h5py.File(tmp_path / "src.h5", "a") as f:
        f.create_dataset("other", data=np.arange(7))
    assert "--fields names 'nope', which it does not have" in run(tmp_path / "src.h5", tmp_path / "o.zarr",
                                                                   "--fields", "nope", check=False)
    assert "dataset '/names' (--fields names) cannot be converted: its dtype |S1" in run(
        tmp_path / "src.h5", tmp_path / "o.zarr", "--fields", "names", check=False)
    stderr = run(tmp_path / "src.h5", tmp_path / "o.zarr", check=False)
    assert "different lengths along axis 0" in stderr and "other [7]" in stderr, stderr
    (tmp_path / "exists.zarr").mkdir()
    assert "already exists" in run(tmp_path / "src.h5", tmp_path / "exists.zarr", check=False)
    (tmp_path / "text.txt").write_text("hello")
    assert "neither an HDF5 file nor an .npz archive" in run(tmp_path / "text.txt", tmp_path / "t.zarr", check=False)


def peak_rss_mib(*args):
    """Peak RSS of one command, measured by a parent that runs only it."""
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); " \
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)"
    out = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_memory_stays_within_the_stated_bound_on_a_file_many_times_larger(tmp_path):
    # 256 MiB of float32 images (contiguous) and gzip-chunked labels, converted with --memory
    # 32MiB. The README's bound: what converting a tiny file takes (the interpreter, h5py,
    # zarr-python and its thread pools) plus --memory.
    rows = (256 << 20) // (32 * 32 * 4 * 4)
    for name, n in (("tiny.h5", 10), ("big.h5", rows)):
        with h5py.File(tmp_path / name, "w") as f:
            images = f.create_dataset("images", shape=(n, 4, 32, 32), dtype="float32")
            rng = np.random.default_rng(0)
            for start in range(0, n, 2048):
                stop = min(n, start + 2048)
                images[start:stop] = rng.standard_normal((stop - start, 4, 32, 32), dtype=np.float32)
            f.create_dataset("label", data=np.arange(n), chunks=(min(n, 1000),), compression="gzip")
    for out in ("big.zarr", "big_npy"):
        base = peak_rss_mib(*CONVERT, tmp_path / "tiny.h5", tmp_path / f"tiny-{out}", "--memory", "32MiB", "--quiet")
        peak = peak_rss_mib(*CONVERT, tmp_path / "big.h5", tmp_path / out, "--memory", "32MiB", "--quiet")
        assert peak < base + 32, f"{out}: peak RSS {peak} MiB, tiny file {base} MiB, file 256 MiB"
        print(f"{out}: peak RSS {peak} MiB (tiny file {base} MiB) converting 256 MiB with --memory 32MiB")
    with h5py.File(tmp_path / "big.h5") as f:
        converted = zarr.open_group(tmp_path / "big.zarr", mode="r")
        for start in range(0, rows, 4096):
            assert np.array_equal(converted["images"][start:start + 4096], f["images"][start:start + 4096])


def test_a_killed_conversion_resumes_and_other_arguments_do_not_mix_with_it(tmp_path):
    rows = 4000
    data = values("float32", (rows, 64, 64), 5)  # 64 MiB
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(50, 64, 64), compression="gzip", compression_opts=1)
    partial = tmp_path / "x.zarr.partial"
    proc = subprocess.Popen([*CONVERT, tmp_path / "src.h5", tmp_path / "x.zarr", "--memory", "6MiB", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = 0
    while done == 0 and proc.poll() is None and time.monotonic() < deadline:
        try:
            done = json.loads((partial / ".conveyor-convert.json").read_text())["done"].get("x", 0)
        except (OSError, ValueError):
            pass
    assert proc.poll() is None and 0 < done < rows, "killed mid-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "x.zarr").exists()

    stderr = run(tmp_path / "src.h5", tmp_path / "x.zarr", "--zstd-level", "9", check=False)
    assert "holds an unfinished conversion of another source or with other options" in stderr, stderr
    summary = run(tmp_path / "src.h5", tmp_path / "x.zarr", "--memory", "6MiB")
    assert summary["resumed"] and summary["verified"]
    assert np.array_equal(zarr.open_group(tmp_path / "x.zarr", mode="r")["x"][:], data)


def test_a_loader_given_an_hdf5_file_points_to_the_converter(tmp_path):
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["eeg"] = np.zeros((10, 4), dtype=np.float32)
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"r={tmp_path / 'rec.h5'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "rec.h5 is an HDF5 file" in result.stderr and f"conveyor-convert {tmp_path / 'rec.h5'} OUT.zarr" in \
        result.stderr, result.stderr


def test_hostile_sources_get_a_clear_refusal_or_a_bound(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    # .npz member names are output file names: none may leave the destination or shadow Conveyor's.
    for member, problem in (("../../escaped", "holds a path separator"), ("__index__", "kept for Conveyor's own")):
        np.savez(tmp_path / "m.npz", ok=np.arange(4), **{member: np.arange(4)})
        stderr = run(tmp_path / "m.npz", dst, check=False)
        assert f"member '{member}.npy' would become field '{member}'" in stderr and problem in stderr, stderr
        assert not (tmp_path / "escaped.npy").exists() and not dst.exists() and "Traceback" not in stderr
    with h5py.File(tmp_path / "h.h5", "w") as f:
        f.create_group("a").create_dataset("b", data=np.arange(4))
        f.create_dataset("a.b", data=np.arange(4))
    stderr = run(tmp_path / "h.h5", dst, check=False)
    assert "dataset '/a.b' and dataset '/a/b' would both become field 'a.b'" in stderr, stderr
    # Chunks h5py would decompress past --memory; a dataset declaring 2^40 rows it does not store;
    # data kept in an external file (which could be any file on the machine).
    (tmp_path / "secret.bin").write_bytes(b"s" * 10)
    cases = {
        "huge_chunks": (dict(shape=(1 << 27, 1), dtype="u1", chunks=(1 << 27, 1), compression="gzip"),
                        "stored in chunks of 134217728 bytes"),
        "sparse": (dict(shape=(1 << 40,), dtype="u1", chunks=(1 << 16,)), "declares 1099511627776 rows"),
        "external": (dict(shape=(10,), dtype="u1", external=[(str(tmp_path / "secret.bin"), 0, 10)]),
                     "keeps its data in external files"),
    }
    for name, (options, problem) in cases.items():
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset(name, **options)
        started = time.monotonic()
        stderr = run(tmp_path / f"{name}.h5", dst, "--memory", "32MiB", "--fields", name, check=False)
        assert problem in stderr and f"dataset '/{name}'" in stderr, stderr
        assert time.monotonic() - started < 60 and not dst.exists()
    assert "pass --allow-sparse" in run(tmp_path / "sparse.h5", dst, "--fields", "sparse", check=False)
    # A dataset that stores what it declares is not sparse, whatever its compression.
    with h5py.File(tmp_path / "zeros.h5", "w") as f:
        f.create_dataset("z", data=np.zeros(1 << 20, dtype="u1"), chunks=(1 << 16,), compression="gzip")
    assert run(tmp_path / "zeros.h5", tmp_path / "zeros.zarr")["verified"]
    # Truncated files: a message, never a traceback.
    write_h5(tmp_path / "whole.h5", n=20)
    data = (tmp_path / "whole.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    stderr = run(tmp_path / "cut.h5", dst, check=False)
    assert "Traceback" not in stderr and "cut.h5" in stderr, stderr

    # An output that failed verification is never promoted, --no-verify or not.
    from conveyor import convert as converter
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("x", data=np.arange(100))
    real_reader = converter.ZarrSink.reader
    monkeypatch.setattr(converter.ZarrSink, "reader",
                        lambda self, name: (lambda start, stop: real_reader(self, name)(start, stop) + 1))
    assert converter.main([str(tmp_path / "v.h5"), str(tmp_path / "v.zarr"), "--quiet"]) == 1
    monkeypatch.setattr(converter.ZarrSink, "reader", real_reader)
    stderr = run(tmp_path / "v.h5", tmp_path / "v.zarr", "--no-verify", check=False)
    assert "failed verification before" in stderr and "--restart" in stderr, stderr
    assert not (tmp_path / "v.zarr").exists()
    assert run(tmp_path / "v.h5", tmp_path / "v.zarr", "--restart")["verified"]
