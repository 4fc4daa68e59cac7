"""Variable-length Zarr arrays as zarr-python writes them (format 3 `string` and
`variable_length_bytes`, format 2 object arrays with numcodecs' VLenUTF8/VLenBytes/VLenArray)
served as ragged fields: every value bit-exact and exactly once, from two replicas and through a
replica killed mid-epoch; a chunk that would decode past --max-vlen-chunk-bytes fails only its
batches."""

import json
import os

import numpy as np
import pytest

import conveyor

zarr = pytest.importorskip("zarr")
numcodecs = pytest.importorskip("numcodecs")

N = 53
CHUNK = 7


def values():
    rng = np.random.default_rng(5)
    texts = [f"doc {i}: " + "é日" * int(rng.integers(0, 40)) for i in range(N)]
    texts[3] = ""
    blobs = [rng.integers(0, 256, size=int(rng.integers(0, 900)), dtype=np.uint8).tobytes() for _ in range(N)]
    return texts, blobs


def write_group(path, zarr_format):
    from zarr.core.dtype import VariableLengthBytes, VariableLengthUTF8

    texts, blobs = values()
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.create_array("text", shape=(N,), chunks=(CHUNK,), dtype=VariableLengthUTF8())[:] = np.array(texts, dtype=object)
    group.create_array("blob", shape=(N,), chunks=(CHUNK,), dtype=VariableLengthBytes())[:] = np.array(blobs, dtype=object)
    group.create_array("label", shape=(N,), chunks=(CHUNK,), dtype="int64")[:] = np.arange(N)
    return texts, blobs


def epoch(addrs, dataset, kill=None, **kwargs):
    """{index: {field: value}} over one epoch; `kill` is called after the second batch."""
    out = {}
    ds = conveyor.StreamingDataset(addrs, dataset, batch_size=5, seed=8, **kwargs)
    for number, batch in enumerate(ds):
        if number == 2 and kill:
            kill()
        # Ragged text and bytes as str and bytes (tolist); arrays as numpy.
        listed = {k: v.tolist() if isinstance(v, conveyor.Ragged) and v.values.dtype == np.uint8 else v
                  for k, v in batch.items()}
        for row, index in enumerate(batch["__index__"].tolist()):
            assert index not in out, "each sample once per epoch"
            out[index] = {k: v[row] for k, v in listed.items() if k != "__index__"}
    return out


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_vlen_strings_and_bytes_arrive_as_written_exactly_once(tmp_path, start_loader, zarr_format):
    texts, blobs = write_group(tmp_path / "g.zarr", zarr_format)
    a = start_loader({"g": tmp_path / "g.zarr"})
    b = start_loader({"g": tmp_path / "g.zarr"})
    info = conveyor.datasets([a.addr])["g"]
    assert info.num_samples == N
    assert info.fields == {"blob": (np.dtype(np.uint8), (None,)), "label": (np.dtype(np.int64), ()),
                           "text": (np.dtype(np.uint8), (None,))}
    for shuffle in ("full", "block"):
        got = epoch([a.addr], "g", shuffle=shuffle)
        assert sorted(got) == list(range(N))
        for i, sample in got.items():
            assert sample["text"] == texts[i], "vlen-utf8 arrives as str"
            assert sample["blob"] == blobs[i], "vlen-bytes arrives as bytes"
            assert sample["label"] == i
    # Both replicas, one killed mid-epoch: every sample exactly once, the same bytes.
    both = epoch([a.addr, b.addr], "g", shuffle="full", kill=a.kill, prefetch=2)
    assert sorted(both) == list(range(N))
    assert all(both[i]["text"] == texts[i] and both[i]["blob"] == blobs[i] for i in both)


def test_numcodecs_vlen_arrays_arrive_as_ragged_arrays_of_their_dtype(tmp_path, start_loader):
    # zarr-python 2 wrote object arrays with a VLenArray filter (zarr-python 3 cannot): the same
    # metadata and chunks, written here with numcodecs itself.
    rng = np.random.default_rng(3)
    arrays = [rng.integers(-(2**31), 2**31 - 1, size=int(rng.integers(0, 20)), dtype=np.int32) for _ in range(N)]
    path = tmp_path / "tokens.zarr"
    os.makedirs(path)
    meta = {"zarr_format": 2, "shape": [N], "chunks": [CHUNK], "dtype": "|O", "fill_value": 0, "order": "C",
            "filters": [{"id": "vlen-array", "dtype": "<i4"}], "compressor": {"id": "zstd", "level": 1},
            "dimension_separator": "."}
    (path / ".zarray").write_text(json.dumps(meta))
    codec, compressor = numcodecs.VLenArray("<i4"), numcodecs.Zstd(level=1)
    for c in range(0, N, CHUNK):
        chunk = np.empty(CHUNK, dtype=object)
        for j in range(CHUNK):
            chunk[j] = arrays[c + j] if c + j < N else np.zeros(0, dtype=np.int32)
        (path / str(c // CHUNK)).write_bytes(compressor.encode(codec.encode(chunk)))
    loader = start_loader({"tokens": path})
    info = conveyor.datasets([loader.addr])["tokens"]
    assert info.fields == {"tokens": (np.dtype(np.int32), (None,))}
    got = epoch([loader.addr], "tokens", shuffle="full")
    assert sorted(got) == list(range(N))
    for i, sample in got.items():
        np.testing.assert_array_equal(sample["tokens"], arrays[i])


def test_a_vlen_chunk_decoding_past_its_bound_fails_only_its_batches(tmp_path, start_loader):
    from zarr.core.dtype import VariableLengthUTF8

    path = tmp_path / "t.zarr"
    texts = ["short"] * N
    texts[20] = "x" * 100_000  # chunk 2 (rows 14..20) decodes to ~100 KB; zstd makes it tiny
    array = zarr.create_array(str(path), shape=(N,), chunks=(CHUNK,), dtype=VariableLengthUTF8())
    array[:] = np.array(texts, dtype=object)
    loader = start_loader({"t": path}, "--max-vlen-chunk-bytes", "64KiB")
    ds = conveyor.StreamingDataset([loader.addr], "t", batch_size=CHUNK, shuffle="none", prefetch=1)
    delivered = []
    with pytest.raises(conveyor.BatchError) as raised:
        for batch in ds:
            delivered.append(batch["t"].tolist())
    message = str(raised.value)
    assert "batch 2 " in message and "chunk c/2" in message and "--max-vlen-chunk-bytes" in message, message
    assert delivered == [["short"] * CHUNK] * 2, "the batches before it arrived whole"
    assert loader.proc.poll() is None, "the loader serves on"
    assert conveyor.datasets([loader.addr])["t"].num_samples == N


def test_a_vlen_array_of_more_than_one_dimension_is_refused_by_name(tmp_path):
    import subprocess

    from conftest import binary
    from zarr.core.dtype import VariableLengthUTF8

    path = tmp_path / "m.zarr"
    zarr.create_array(str(path), shape=(4, 2), chunks=(2, 2), dtype=VariableLengthUTF8())
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"m={path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "m.zarr" in result.stderr and "must be 1-dimensional" in result.stderr, result.stderr
