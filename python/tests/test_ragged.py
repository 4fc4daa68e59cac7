"""Ragged fields (samples of different lengths) written by numpy as values plus FIELD.offsets.npy,
read through the Python package: conveyor.Ragged with numpy output, jagged nested tensors with
torch output, every sample bit-exact and exactly once."""

import os

import numpy as np
import pytest

import conveyor

N = 61


def write_ragged(path):
    """`tokens`: rows of 2 int32 (some samples empty); `text`: UTF-8 bytes; `label`: int64."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 5, size=N)
    lengths[0] = 0
    tokens = [rng.integers(-1000, 1000, size=(n, 2)).astype(np.int32) for n in lengths]
    np.save(os.path.join(path, "tokens.npy"), np.concatenate(tokens))
    np.save(os.path.join(path, "tokens.offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    texts = [f"sample {i} " + "é" * (i % 4) for i in range(N)]
    encoded = [t.encode() for t in texts]
    np.save(os.path.join(path, "text.npy"), np.frombuffer(b"".join(encoded), dtype=np.uint8))
    np.save(os.path.join(path, "text.offsets.npy"), np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64))
    np.save(os.path.join(path, "label.npy"), np.arange(N, dtype=np.int64))
    return tokens, texts


def test_ragged_fields_arrive_as_ragged_batches_bit_exact_and_exactly_once(tmp_path, start_loader):
    tokens, texts = write_ragged(tmp_path / "r")
    loader = start_loader({"r": tmp_path / "r"})
    info = conveyor.datasets([loader.addr])["r"]
    assert info.fields["tokens"] == (np.dtype(np.int32), (None, 2))
    assert info.fields["text"] == (np.dtype(np.uint8), (None,))
    assert info.fields["label"] == (np.dtype(np.int64), ())

    ds = conveyor.StreamingDataset([loader.addr], "r", batch_size=8, shuffle="full", seed=4)
    seen = []
    for batch in ds:
        index = batch["__index__"]
        assert isinstance(batch["tokens"], conveyor.Ragged) and len(batch["tokens"]) == len(index)
        assert batch["tokens"].offsets[0] == 0 and batch["tokens"].offsets.dtype == np.int64
        for position, i in enumerate(index):
            np.testing.assert_array_equal(batch["tokens"][position], tokens[i])
            assert batch["text"].tolist()[position].decode() == texts[i]
        np.testing.assert_array_equal(batch["tokens"].lengths(), [len(tokens[i]) for i in index])
        np.testing.assert_array_equal(batch["label"], index)
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(N))

    first = next(iter(ds))["tokens"]
    padded, lengths = first.pad(value=-1)
    assert padded.shape == (len(first), int(lengths.max()), 2)
    for i in range(len(first)):
        np.testing.assert_array_equal(padded[i, : lengths[i]], first[i])
        assert (padded[i, lengths[i]:] == -1).all()
    cut, kept = first.pad(length=1)
    assert cut.shape == (len(first), 1, 2) and kept.max() <= 1
    with pytest.raises(IndexError):
        first[len(first)]


def test_torch_output_is_a_jagged_nested_tensor_per_ragged_field(tmp_path, start_loader):
    torch = pytest.importorskip("torch")
    tokens, texts = write_ragged(tmp_path / "r")
    loader = start_loader({"r": tmp_path / "r"})
    ds = conveyor.StreamingDataset([loader.addr], "r", batch_size=16, shuffle="none", output="torch")
    seen = 0
    for batch in ds:
        nested = batch["tokens"]
        assert nested.is_nested and nested.dtype == torch.int32
        for sample, i in zip(nested.unbind(), batch["__index__"].tolist()):
            assert sample.shape == (len(tokens[i]), 2)
            assert torch.equal(sample, torch.from_numpy(tokens[i]))
        text = [bytes(t.tolist()).decode() for t in batch["text"].unbind()]
        assert text == [texts[i] for i in batch["__index__"].tolist()]
        assert torch.equal(batch["label"], batch["__index__"])
        seen += len(batch["__index__"])
    assert seen == N
