"""Token streams: a 1-D .npy or a raw .bin token file (as nanoGPT writes train.bin) served as
windows of L + 1 tokens with stride L, checked against a reference computed here."""

import subprocess

import numpy as np
import pytest

import conveyor
from conftest import binary


def reference_windows(tokens, length):
    """Window k is tokens[k*L : k*L + L + 1]; as many as fit."""
    count = (len(tokens) - 1) // length
    return [tokens[k * length: k * length + length + 1] for k in range(count)]


def served(addrs, dataset, field="tokens", kill=None, **kwargs):
    out = {}
    ds = conveyor.StreamingDataset(addrs, dataset, batch_size=7, shuffle="full", seed=5, **kwargs)
    for number, batch in enumerate(ds):
        if number == 2 and kill:
            kill()
        for row, index in enumerate(batch["__index__"].tolist()):
            assert index not in out, "each window once per epoch"
            out[index] = batch[field][row].copy()
    return out


def test_windows_of_a_npy_token_file_are_every_stride_exactly_once(tmp_path, start_loader):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50_000, size=1003, dtype=np.uint16)
    np.save(tmp_path / "train.npy", tokens)
    a = start_loader({"t": tmp_path / "train.npy"}, "--windows", "t=16")
    b = start_loader({"t": tmp_path / "train.npy"}, "--windows", "t=16")
    info = conveyor.datasets([a.addr])["t"]
    expected = reference_windows(tokens, 16)
    assert info.num_samples == len(expected) == 62
    assert info.fields == {"train": (np.dtype(np.uint16), (17,))}
    for got in (served([a.addr], "t", "train"), served([a.addr, b.addr], "t", "train", kill=a.kill, prefetch=2)):
        assert sorted(got) == list(range(62))
        for k, window in got.items():
            np.testing.assert_array_equal(window, expected[k])
    # Every token but the last few is an input (window[:-1]) of exactly one window.
    inputs = np.concatenate([expected[k][:-1] for k in range(62)])
    np.testing.assert_array_equal(inputs, tokens[: 62 * 16])


def test_a_raw_bin_token_file_needs_its_dtype_and_serves_windows(tmp_path, start_loader):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 2**31, size=500, dtype=np.uint32)
    tokens.astype("<u4").tofile(tmp_path / "train.bin")  # nanoGPT's prepare.py writes train.bin so
    loader = start_loader({"t": tmp_path / "train.bin"}, "--token-dtype", "t=uint32", "--windows", "t=64")
    assert conveyor.datasets([loader.addr])["t"].fields == {"tokens": (np.dtype(np.uint32), (65,))}
    got = served([loader.addr], "t")
    expected = reference_windows(tokens, 64)
    assert sorted(got) == list(range(len(expected))) and len(expected) == 7
    for k, window in got.items():
        np.testing.assert_array_equal(window, expected[k])
    # Without --windows a token file is one token a sample.
    plain = start_loader({"t": tmp_path / "train.bin"}, "--token-dtype", "t=uint32")
    assert conveyor.datasets([plain.addr])["t"].num_samples == 500


@pytest.mark.parametrize("files, flags, expected", [
    ({"train.bin": 10}, ["--windows", "t=4"], "give its element type with --token-dtype t=uint16"),
    ({"train.bin": 11}, ["--token-dtype", "t=uint16"], "holds 11 bytes, not a whole number of uint16 tokens"),
    ({"train.bin": 10}, ["--token-dtype", "t=float32"], "--token-dtype float32 is not an integer type"),
    ({"train.bin": 10}, ["--token-dtype", "t=uint8", "--windows", "t=10"], "needs at least 11 tokens"),
    ({"train.bin": 10}, ["--token-dtype", "u=uint8"], "names no --dataset (the datasets are t)"),
    ({"train.bin": 10}, ["--token-dtype", "t=uint8", "--windows", "t=0"], "a window length of at least 1"),
    ({"d/a.npy": 10, "d/b.npy": 10}, ["--windows", "t=4"], "needs one field of token ids and the dataset has 2"),
])
def test_token_files_and_windows_that_cannot_work_are_refused_by_name(tmp_path, files, flags, expected):
    for name, n in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        if name.endswith(".npy"):
            np.save(tmp_path / name, np.arange(n, dtype=np.uint16))
        else:
            (tmp_path / name).write_bytes(bytes(n))
    path = tmp_path / ("d" if "d/a.npy" in files else "train.bin")
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"t={path}", *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def reference_packing(documents, length, eos):
    """Documents joined, each followed by `eos`, cut into windows of L + 1 with stride L; per
    token its document's number within the window and its position within the document."""
    stream, document_of, position = [], [], []
    for d, doc in enumerate(documents):
        for p, token in enumerate(list(doc) + [eos]):
            stream.append(token)
            document_of.append(d)
            position.append(p)
    count = (len(stream) - 1) // length
    out = []
    for k in range(count):
        span = slice(k * length, k * length + length + 1)
        docs = np.array(document_of[span])
        out.append((np.array(stream[span]), docs - docs[0], np.array(position[span])))
    return out


def write_documents(path, n=70, seed=3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, size=n)
    lengths[[0, 5]] = 0  # empty documents are EOS alone
    lengths[9] = 100  # longer than a window
    documents = [rng.integers(0, 50_000, size=int(k)).astype(np.int32) for k in lengths]
    path.mkdir()
    np.save(path / "text.npy", np.concatenate(documents))
    np.save(path / "text.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return documents


def test_packed_documents_match_a_reference_with_segment_and_position_ids(tmp_path, start_loader):
    documents = write_documents(tmp_path / "docs")
    args = ("--pack", "d=32,eos=50256")
    a, b = start_loader({"d": tmp_path / "docs"}, *args), start_loader({"d": tmp_path / "docs"}, *args)
    expected = reference_packing(documents, 32, 50256)
    info = conveyor.datasets([a.addr])["d"]
    assert info.num_samples == len(expected)
    assert info.fields == {"tokens": (np.dtype(np.int32), (33,)), "segment_ids": (np.dtype(np.int32), (33,)),
                           "position_ids": (np.dtype(np.int32), (33,))}
    for addrs, kill in (([a.addr], None), ([a.addr, b.addr], a.kill)):
        seen = {}
        ds = conveyor.StreamingDataset(addrs, "d", batch_size=5, shuffle="full", seed=9, prefetch=2)
        for number, batch in enumerate(ds):
            if number == 2 and kill:
                kill()
            for row, k in enumerate(batch["__index__"].tolist()):
                assert k not in seen
                seen[k] = True
                tokens, segments, positions = expected[k]
                np.testing.assert_array_equal(batch["tokens"][row], tokens)
                np.testing.assert_array_equal(batch["segment_ids"][row], segments)
                np.testing.assert_array_equal(batch["position_ids"][row], positions)
        assert sorted(seen) == list(range(len(expected)))
    # Every document token and every EOS is an input of exactly one window.
    inputs = np.concatenate([t[:-1] for t, _, _ in expected])
    stream = np.concatenate([np.append(doc, 50256) for doc in documents])
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])
    assert len(stream) - len(inputs) <= 32


@pytest.mark.parametrize("flags, expected", [
    (["--pack", "d=8,eos=70000", "--fields", "d=text"], "eos=70000 is not a token id of the documents' dtype uint16"),
    (["--pack", "d=8"], "joins documents with an EOS token: write NAME=L,eos=ID"),
    (["--pack", "d=8,bins"], "packs whole documents into padded sequences: add pad=ID"),
    (["--pack", "d=8,bins,pad=1,size=3"], "'size=3' is not eos=ID, pad=ID, bins or concat"),
    (["--pack", "d=8,eos=1", "--windows", "d=8"], "--windows and --pack both name it"),
    (["--pack", "d=8,eos=1"], "--pack needs one ragged field of documents' token ids and the dataset has 2"),
    (["--pack", "d=30,eos=1", "--fields", "d=text"], "needs at least 31 tokens and the documents and their EOS"),
    (["--pack", "d=8,eos=1", "--fields", "d=plain"], "needs documents as a ragged field of token ids"),
])
def test_packing_that_cannot_work_is_refused_by_name(tmp_path, flags, expected):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "text.npy", np.arange(20, dtype=np.uint16))
    np.save(tmp_path / "d" / "text.offsets.npy", np.array([0, 5, 20], dtype=np.int64))
    np.save(tmp_path / "d" / "plain.npy", np.arange(2, dtype=np.uint16))
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"d={tmp_path / 'd'}",
                             *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def reference_bins(documents, length, eos, pad, block=1024):
    """First-fit decreasing within blocks of documents, as the loader documents it."""
    sequences = []
    for first in range(0, len(documents), block):
        items = []
        for d in range(first, min(first + block, len(documents))):
            total = len(documents[d]) + (eos is not None)
            for start in range(0, total, length):
                items.append((d, start, min(start + length, total)))
        items.sort(key=lambda item: -(item[2] - item[1]))  # stable: ties keep stored order
        bins = []
        for item in items:
            for b in bins:
                if b[0] + item[2] - item[1] <= length:
                    b[0] += item[2] - item[1]
                    b[1].append(item)
                    break
            else:
                bins.append([item[2] - item[1], [item]])
        for _, pieces in bins:
            tokens, segments, positions = [], [], []
            for segment, (d, start, end) in enumerate(sorted(pieces)):
                full = list(documents[d]) + ([eos] if eos is not None else [])
                tokens += full[start:end]
                segments += [segment] * (end - start)
                positions += list(range(start, end))
            fill = length - len(tokens)
            sequences.append((np.array(tokens + [pad] * fill), np.array(segments + [-1] * fill),
                              np.array(positions + [0] * fill)))
    return sequences


def test_bin_packing_places_whole_documents_as_a_reference_first_fit_does(tmp_path, start_loader):
    documents = write_documents(tmp_path / "docs", n=1500, seed=8)  # two blocks of documents
    loader = start_loader({"d": tmp_path / "docs"}, "--pack", "d=64,bins,pad=0,eos=2")
    expected = reference_bins(documents, 64, eos=2, pad=0)
    info = conveyor.datasets([loader.addr])["d"]
    assert info.num_samples == len(expected)
    assert info.fields["tokens"] == (np.dtype(np.int32), (64,))
    seen = set()
    for batch in conveyor.StreamingDataset([loader.addr], "d", batch_size=50, shuffle="full", seed=1):
        for row, k in enumerate(batch["__index__"].tolist()):
            seen.add(k)
            tokens, segments, positions = expected[k]
            np.testing.assert_array_equal(batch["tokens"][row], tokens)
            np.testing.assert_array_equal(batch["segment_ids"][row], segments)
            np.testing.assert_array_equal(batch["position_ids"][row], positions)
    assert seen == set(range(len(expected)))
    # Every document token (and its EOS) is in exactly one sequence.
    total = sum(len(doc) + 1 for doc in documents)
    assert sum(int((segments >= 0).sum()) for _, segments, _ in expected) == total
