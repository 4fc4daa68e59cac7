"""Datasets as users already have them: Zarr groups written by xarray, `.npz` archives written by
numpy, against real loader processes."""

import gzip
import os
import shutil
import struct
import subprocess
import zipfile

import numpy as np
import pytest
import xarray as xr

import conveyor
from conftest import binary, write_dtypes

# zarr-python warns that string coordinates have no Zarr v3 specification yet; xarray writes them.
pytestmark = pytest.mark.filterwarnings("ignore:The data type", "ignore:Consolidated metadata")


def epoch(loader, name, shuffle, batch_size=32, seed=5):
    """Every batch of one epoch, with each field's rows put back in index order."""
    ds = conveyor.StreamingDataset([loader.addr], name, batch_size=batch_size, shuffle=shuffle, seed=seed)
    batches = list(ds)
    index = np.concatenate([b["__index__"] for b in batches])
    order = np.argsort(index)
    fields = {k: np.concatenate([b[k] for b in batches])[order] for k in batches[0] if k != "__index__"}
    return index, fields


def refusal(*args):
    """The loader's start-up error for these flags."""
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", *map(str, args)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout
    return result.stderr


def eeg_dataset(n=200):
    """An EEG set as xarray users write it: data variables along `window`, string and float
    coordinates, non-dimension coordinates along `window` (one of datetimes, which xarray stores
    as integers with CF units), and a variable without `window`."""
    rng = np.random.default_rng(11)
    eeg = rng.standard_normal((n, 16, 50)).astype("float32")
    eeg[3, 2, 7] = np.nan  # NaN payloads must survive bit for bit
    return xr.Dataset(
        {
            "eeg": (("window", "channel", "time"), eeg),
            "label": (("window",), rng.integers(1, 5, n).astype("int64")),
            "montage": (("channel", "xyz"), rng.standard_normal((16, 3))),
        },
        coords={
            "channel": [f"Fp{i}" for i in range(16)],
            "time": np.arange(50) / 250.0,
            "subject": (("window",), (np.arange(n) // 40).astype("int32")),
            "start": (("window",), np.datetime64("2026-01-05T09:00") + np.arange(n) * np.timedelta64(2, "s")),
        },
    )


def write_eeg(path, zarr_format, consolidated, n=200):
    ds = eeg_dataset(n)
    encoding = {"eeg": {"chunks": (32, 16, 50)}, "label": {"chunks": (32,)}}
    ds.to_zarr(path, zarr_format=zarr_format, consolidated=consolidated, mode="w", encoding=encoding)
    return ds


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [False, True])
def test_xarray_zarr_serves_its_data_variables_and_describes_its_coordinates(
        tmp_path, start_loader, zarr_format, consolidated):
    ds = write_eeg(tmp_path / "eeg.zarr", zarr_format, consolidated)
    if consolidated:
        # The consolidated metadata is what the loader reads: without the arrays' own metadata
        # files it still opens (as zarr-python does with consolidated=True).
        for name in ("eeg", "label", "channel"):
            for meta in (".zarray", ".zattrs", "zarr.json"):
                if (tmp_path / "eeg.zarr" / name / meta).exists():
                    os.remove(tmp_path / "eeg.zarr" / name / meta)
    loader = start_loader({"eeg": tmp_path / "eeg.zarr"})
    info = conveyor.datasets([loader.addr])["eeg"]
    assert info.num_samples == 200
    assert info.fields == {"eeg": (np.dtype("float32"), (16, 50)), "label": (np.dtype("int64"), ())}
    assert info.dimensions == {"eeg": ("window", "channel", "time"), "label": ("window",)}
    assert set(info.coordinates) == {"channel", "time", "subject", "start"}
    assert info.coordinates["time"] == conveyor.ArrayInfo(info.coordinates["time"].dtype, (50,), ("time",),
                                                           reason=info.coordinates["time"].reason)
    assert info.coordinates["time"].dtype in ("float64", "<f8")
    assert info.coordinates["channel"].shape == (16,)
    # Datetimes are integers on disk; the units say what they count, as xarray wrote them.
    start = info.coordinates["start"]
    assert start.dtype in ("int64", "<i8") and start.dimensions == ("window",), start
    assert start.units.startswith(("seconds since 2026-01-05", "minutes since 2026-01-05")), start
    assert start.calendar == "proleptic_gregorian", start
    # A data variable without the sample dimension is a variable, not a coordinate, with why.
    assert set(info.variables) == {"montage"}
    montage = info.variables["montage"]
    assert montage.shape == (16, 3) and montage.dimensions == ("channel", "xyz")
    assert "do not include the sample dimension 'window'" in montage.reason, montage

    for shuffle in ("full", "block"):
        index, fields = epoch(loader, "eeg", shuffle)
        assert sorted(index.tolist()) == list(range(200)), f"{shuffle}: exactly once"
        assert fields["eeg"].tobytes() == ds["eeg"].values.tobytes(), shuffle
        assert np.array_equal(fields["label"], ds["label"].values), shuffle

    described = subprocess.run([binary("trainer-client"), "info", "--loader", loader.addr],
                               capture_output=True, text=True, check=True).stdout
    assert "dimensions (window, channel, time)" in described, described
    assert "coordinate channel" in described and "(described, not served)" in described, described
    assert "variable montage" in described and "coordinate montage" not in described, described
    assert f"units '{start.units}' calendar 'proleptic_gregorian'" in described, described


def test_fields_choose_arrays_of_a_group_and_unknown_or_unfit_names_are_refused(tmp_path, start_loader):
    ds = write_eeg(tmp_path / "eeg.zarr", 3, False)
    path = tmp_path / "eeg.zarr"
    # A coordinate along the sample dimension can be served when it is asked for.
    loader = start_loader({"e": path}, "--fields", "e=subject,label")
    info = conveyor.datasets([loader.addr])["e"]
    assert set(info.fields) == {"label", "subject"} and "eeg" in info.variables and "eeg" not in info.coordinates
    assert info.variables["eeg"].reason == "not in --fields"
    _, fields = epoch(loader, "e", "full")
    assert np.array_equal(fields["subject"], ds["subject"].values)

    stderr = refusal("--dataset", f"e={path}", "--fields", "e=eg")
    assert "--fields names 'eg', which is not in" in stderr, stderr
    assert "it has: channel (coordinate), eeg, label, montage, start (coordinate), subject (coordinate), time (coordinate)" in stderr, stderr
    stderr = refusal("--dataset", f"e={path}", "--fields", "e=eeg,montage")
    assert "start with different dimensions: eeg (window, ...), montage (channel, ...)" in stderr, stderr
    stderr = refusal("--dataset", f"e={path}", "--fields", "x=eeg")
    assert "names dataset 'x', which no --dataset gives; the datasets are: e" in stderr, stderr


def test_a_variable_with_the_sample_dimension_not_first_is_described_with_the_fix(tmp_path, start_loader):
    rng = np.random.default_rng(2)
    x, y, z = rng.standard_normal((40, 3)), rng.standard_normal((3, 40)), rng.integers(0, 9, 40)
    xr.Dataset({"x": (("sample", "f"), x), "y": (("f", "sample"), y), "z": (("sample",), z)}).to_zarr(
        tmp_path / "t.zarr", zarr_format=3, consolidated=False)
    loader = start_loader({"t": tmp_path / "t.zarr"})
    info = conveyor.datasets([loader.addr])["t"]
    assert set(info.fields) == {"x", "z"} and set(info.variables) == {"y"} and not info.coordinates
    assert "have the sample dimension 'sample' but not first" in info.variables["y"].reason
    stderr = refusal("--dataset", f"t={tmp_path / 't.zarr'}", "--fields", "t=z,y")
    assert "start with different dimensions: y (f, ...), z (sample, ...)" in stderr, stderr
    # Two variables, each first along another dimension: no majority, so the user decides.
    xr.Dataset({"x": (("sample", "f"), x), "y": (("f", "sample"), y)}).to_zarr(tmp_path / "tie.zarr", zarr_format=2)
    stderr = refusal("--dataset", f"t={tmp_path / 'tie.zarr'}")
    assert "the data variables start with different dimensions: x (sample, ...), y (f, ...)" in stderr, stderr
    assert "--fields NAME=FIELD" in stderr, stderr


def test_a_group_without_dimension_names_keeps_the_length_rule_and_fields_pick_around_it(tmp_path, start_loader):
    import zarr
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    group.create_array("a", shape=(100, 2), chunks=(10, 2), dtype="int32")[:] = np.arange(200).reshape(100, 2)
    group.create_array("b", shape=(50,), chunks=(10,), dtype="int32")[:] = np.arange(50)
    stderr = refusal("--dataset", f"g={tmp_path / 'g.zarr'}")
    assert "field 'b' has 50 samples but field 'a' has 100" in stderr and "--fields g=FIELD" in stderr, stderr
    loader = start_loader({"g": tmp_path / "g.zarr"}, "--fields", "g=a")
    index, fields = epoch(loader, "g", "block", batch_size=16)
    assert sorted(index.tolist()) == list(range(100))
    assert np.array_equal(fields["a"], np.arange(200).reshape(100, 2))


def local_extra_ids(path, member):
    """The extra-field header ids of a member's local header (0x0001 is zip64)."""
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(member).header_offset
    with open(path, "rb") as f:
        f.seek(offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(offset + 30 + name_len)
        extra = f.read(extra_len)
    ids, at = [], 0
    while at + 4 <= len(extra):
        header_id, size = struct.unpack("<HH", extra[at:at + 4])
        ids.append(header_id)
        at += 4 + size
    return ids


def test_npz_members_are_fields_of_every_dtype_mapped_in_place(tmp_path, start_loader):
    fields = write_dtypes(tmp_path / "npy")
    rng = np.random.default_rng(3)
    shards = [rng.integers(0, 1000, (n, 2)).astype("uint16") for n in (20, 0, 33)]
    members = dict(fields, **{f"s-{i:05d}": s for i, s in enumerate(shards)})
    np.savez(tmp_path / "all.npz", **members)
    assert 1 in local_extra_ids(tmp_path / "all.npz", "f_int8.npy"), "numpy writes zip64 local headers"
    loader = start_loader({"z": tmp_path / "all.npz"})
    info = conveyor.datasets([loader.addr])["z"]
    assert info.num_samples == 53 and set(info.fields) == set(fields) | {"s"}
    index, got = epoch(loader, "z", "full", batch_size=7)
    assert sorted(index.tolist()) == list(range(53))
    for name, source in fields.items():
        assert got[name].tobytes() == source.astype(source.dtype.newbyteorder("<")).tobytes(), name
    assert np.array_equal(got["s"], np.concatenate(shards)), "shards concatenate in name order"

    loader = start_loader({"z": tmp_path / "all.npz"}, "--fields", "z=f_float32,s")
    assert set(conveyor.datasets([loader.addr])["z"].fields) == {"f_float32", "s"}
    stderr = refusal("--dataset", f"z={tmp_path / 'all.npz'}", "--fields", "z=f_float")
    assert "--fields names 'f_float'" in stderr and "f_float32" in stderr, stderr


def test_npz_files_that_cannot_be_mapped_are_refused_naming_the_member_and_the_fix(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", board=np.zeros((10, 8), "int8"), label=np.arange(10))
    stderr = refusal("--dataset", f"c={tmp_path / 'c.npz'}")
    assert "c.npz (member board.npy): compressed (Deflated)" in stderr, stderr
    assert "np.savez instead of np.savez_compressed" in stderr and "conveyor-convert" in stderr, stderr

    np.savez(tmp_path / "o.npz", ok=np.arange(4), objects=np.array([{"a": 1}] * 4, dtype=object))
    stderr = refusal("--dataset", f"o={tmp_path / 'o.npz'}")
    assert "o.npz (member objects.npy)" in stderr and "object" in stderr, stderr

    (tmp_path / "junk.npz").write_bytes(b"not a zip at all" * 10)
    stderr = refusal("--dataset", f"j={tmp_path / 'junk.npz'}")
    assert "junk.npz: not a readable zip archive" in stderr, stderr

    np.savez(tmp_path / "short.npz", x=np.arange(1000))
    data = (tmp_path / "short.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:-200])  # the central directory is gone
    stderr = refusal("--dataset", f"x={tmp_path / 'cut.npz'}")
    assert "cut.npz: not a readable zip archive" in stderr, stderr

    np.savez(tmp_path / "u.npz", a=np.arange(10), b=np.arange(11))
    stderr = refusal("--dataset", f"u={tmp_path / 'u.npz'}")
    assert "field 'b' has 11 samples but field 'a' has 10" in stderr, stderr


def test_a_zarr_array_whose_sample_size_overflows_is_refused_at_start_up(tmp_path):
    import zarr
    group = zarr.open_group(tmp_path / "big.zarr", mode="w", zarr_format=3)
    # Metadata alone (no chunk is written): 2^31 x 2^31 float64 per sample, 2^65 bytes.
    group.create_array("huge", shape=(4, 2**31, 2**31), chunks=(1, 1024, 1024), dtype="float64")
    stderr = refusal("--dataset", f"b={tmp_path / 'big.zarr'}")
    assert "one sample of array 'huge'" in stderr and "is over 4294967296 bytes" in stderr, stderr
    assert "panicked" not in stderr, stderr


@pytest.mark.parametrize("member, shown", [("__index__", '"__index__"'), ("../../escaped", '"../../escaped"'),
                                           ("a\\b", '"a\\\\b"')])
def test_field_names_a_client_cannot_use_safely_are_refused_at_start_up(tmp_path, member, shown):
    # A member name becomes a dict key in the trainer and a file name in `--dump` directories.
    np.savez(tmp_path / "n.npz", ok=np.arange(4), **{member: np.arange(4)})
    stderr = refusal("--dataset", f"n={tmp_path / 'n.npz'}")
    assert f"field name {shown} cannot be served" in stderr and "rename" in stderr, stderr


def zstd_rle_frame(length, byte=7):
    """A valid zstd frame of `length` copies of `byte` that declares its size: RLE blocks of 128 KiB,
    4 bytes each, so a gigabyte takes 32 KB."""
    block = 128 << 10
    frame = bytearray(b"\x28\xb5\x2f\xfd\xe0") + length.to_bytes(8, "little")
    left = length
    while left > 0:
        size = min(left, block)
        left -= size
        frame += ((left == 0) | (1 << 1) | (size << 3)).to_bytes(3, "little") + bytes([byte])
    return bytes(frame)


def zstd_rle_frame_unsized(length, byte=7):
    """The same frame without a declared content size (a streaming writer's frame): its header
    gives a 128 KiB window instead."""
    sized = zstd_rle_frame(length, byte)
    return b"\x28\xb5\x2f\xfd\x00\x38" + sized[13:]


def crc32c(data):
    """CRC-32C (Castagnoli), as zarr's crc32c codec appends it."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return (crc ^ 0xFFFFFFFF).to_bytes(4, "little")


def gzip_of_zeros(length):
    import zlib
    out = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip container
    zeros = bytes(1 << 20)
    parts = [out.compress(zeros) for _ in range(length >> 20)]
    return b"".join(parts) + out.flush()


def bomb_array(tmp_path, compressors, zarr_format=3):
    import zarr
    path = tmp_path / "bomb.zarr"
    array = zarr.create_array(path, shape=(16, 4), chunks=(8, 4), dtype="uint8", compressors=compressors,
                              zarr_format=zarr_format, fill_value=0)
    array[:] = np.full((16, 4), 5, dtype=np.uint8)
    return path, (path / "c" / "0" / "0") if zarr_format == 3 else (path / "0.0")


@pytest.mark.parametrize("case", ["zstd then crc32c", "zstd frames after a small one, then junk", "gzip",
                                  "blosc header", "zstd inside gzip", "gzip inside gzip"])
def test_a_compressed_chunk_that_would_decode_past_its_shape_fails_its_batch_within_the_loaders_memory(
        tmp_path, start_loader, case):
    import zarr
    import numcodecs
    gib = 1 << 30
    if case == "zstd then crc32c":
        path, chunk = bomb_array(tmp_path, [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()])
        # A small valid frame, then a gigabyte one: the first alone is within the chunk's 32 bytes.
        frames = zstd_rle_frame(32) + zstd_rle_frame_unsized(gib)
        chunk.write_bytes(frames + crc32c(frames))
        expected = "zstd stream decodes to more than 32 bytes"
    elif case == "zstd frames after a small one, then junk":
        path, chunk = bomb_array(tmp_path, [zarr.codecs.ZstdCodec()])
        chunk.write_bytes(zstd_rle_frame(16) + zstd_rle_frame_unsized(gib) + b"junk")
        expected = "zstd stream decodes to more than 32 bytes"
    elif case == "gzip":
        path, chunk = bomb_array(tmp_path, [zarr.codecs.GzipCodec()])
        chunk.write_bytes(gzip_of_zeros(gib))
        expected = "gzip stream decodes to more than 32 bytes"
    elif case == "zstd inside gzip":
        # The outer gzip layer inflates to a few bytes; the zstd frame inside it to a gigabyte.
        path, chunk = bomb_array(tmp_path, [zarr.codecs.ZstdCodec(), zarr.codecs.GzipCodec()])
        chunk.write_bytes(gzip.compress(zstd_rle_frame(16) + zstd_rle_frame_unsized(gib)))
        expected = "its zstd frames declare 1073741840 decoded bytes"
    elif case == "gzip inside gzip":
        # 1 GiB of zeros gzipped twice is ~5 KB; the outer layer alone inflates past the bound.
        path, chunk = bomb_array(tmp_path, [zarr.codecs.GzipCodec(), zarr.codecs.GzipCodec()])
        chunk.write_bytes(gzip.compress(gzip_of_zeros(gib)))
        expected = "gzip stream decodes to more than 65572 bytes (the compressed chunk inside it at most)"
    else:
        path, chunk = bomb_array(tmp_path, numcodecs.Blosc(), zarr_format=2)
        header = bytearray(chunk.read_bytes())
        header[4:8] = (3 * gib).to_bytes(4, "little")
        chunk.write_bytes(bytes(header))
        expected = "blosc header declares 3221225472 decoded bytes"
    loader = start_loader({"b": path})
    ds = conveyor.StreamingDataset([loader.addr], "b", batch_size=8, shuffle="none")
    with pytest.raises(conveyor.BatchError) as caught:
        list(ds)
    message = str(caught.value)
    assert expected in message and "was not decoded" in message, message
    # The loader lives on and serves the other chunk.
    other = conveyor.StreamingDataset([loader.addr], "b", batch_size=8, shuffle="none")
    it = iter(other)
    with pytest.raises(conveyor.BatchError):
        next(it)
    assert loader.proc.poll() is None
    # Its peak resident memory stayed far below the gigabytes the chunk would decode to.
    status = open(f"/proc/{loader.proc.pid}/status").read()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    assert peak_kb < 300 << 10, f"the loader peaked at {peak_kb} kB"


def test_a_chain_of_two_compressors_serves_incompressible_chunks_bit_exactly(tmp_path, start_loader):
    import zarr
    # Random bytes do not compress: the zstd layer inside gzip is larger than the chunk itself,
    # which the layer-by-layer bound must allow.
    data = np.random.default_rng(4).integers(0, 256, (64, 300), dtype=np.uint8)
    array = zarr.create_array(tmp_path / "r.zarr", shape=data.shape, chunks=(16, 300), dtype="uint8",
                              compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.GzipCodec()], zarr_format=3)
    array[:] = data
    loader = start_loader({"r": tmp_path / "r.zarr"})
    index, fields = epoch(loader, "r", "full", batch_size=10)
    assert sorted(index.tolist()) == list(range(64))
    assert fields["r"].tobytes() == data.tobytes()


def test_npz_members_that_overlap_in_the_archive_are_refused(tmp_path):
    np.savez(tmp_path / "o.npz", a=np.arange(8), b=np.arange(8) * 2)
    data = bytearray((tmp_path / "o.npz").read_bytes())
    # Point b's central directory entry at a's local header: both would map a's bytes.
    entries = [i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"]
    offsets = [struct.unpack_from("<I", data, i + 42)[0] for i in entries]
    struct.pack_into("<I", data, entries[1] + 42, offsets[0])
    (tmp_path / "crafted.npz").write_bytes(bytes(data))
    stderr = refusal("--dataset", f"c={tmp_path / 'crafted.npz'}")
    assert "overlap in the archive" in stderr and "a.npy" in stderr and "b.npy" in stderr, stderr
