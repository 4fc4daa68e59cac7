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


def write_image_folder(root):
    """A torchvision-style ImageFolder written by Pillow: PNG and JPEG files of varied sizes in
    class directories (one nested), plus a file that is not an image. Returns the samples in
    torchvision's order: (path, class index)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    layout = {"cat": ["a.png", "b.jpg", "c.PNG"], "dog": ["z.jpg", "sub/y.png"], "eel": ["only.webp"]}
    for cls, names in layout.items():
        for name in names:
            path = os.path.join(root, cls, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            size = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    with open(os.path.join(root, "cat", "notes.txt"), "w") as f:
        f.write("not an image")
    # torchvision.datasets.ImageFolder's order: sorted classes; in each, sorted(os.walk(...)) and
    # sorted file names, keeping image extensions (compared in lower case).
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    samples = []
    for label, cls in enumerate(sorted(layout)):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(extensions):
                    samples.append((os.path.join(dirpath, name), label))
    return samples


def test_an_image_folder_serves_each_files_bytes_and_its_class_index_as_torchvision_orders_them(
        tmp_path, start_loader):
    from PIL import Image
    import io

    samples = write_image_folder(tmp_path / "images")
    loader = start_loader({"images": tmp_path / "images"})
    info = conveyor.datasets([loader.addr])["images"]
    assert info.num_samples == len(samples) == 6
    assert info.fields == {"image": (np.dtype(np.uint8), (None,)), "label": (np.dtype(np.int64), ())}
    ds = conveyor.StreamingDataset([loader.addr], "images", batch_size=4, shuffle="full", seed=1)
    seen = []
    for batch in ds:
        images = batch["image"].tolist()
        for position, i in enumerate(batch["__index__"]):
            path, label = samples[i]
            with open(path, "rb") as f:
                assert images[position] == f.read(), path
            assert batch["label"][position] == label
            # The bytes decode as the file does.
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images[position]))),
                                          np.asarray(Image.open(path)))
            seen.append(int(i))
    assert sorted(seen) == list(range(len(samples)))

    # A file that changes after start-up is refused by name, never served changed.
    changed, _ = samples[2]
    with open(changed, "ab") as f:
        f.write(b"appended")
    with pytest.raises(conveyor.BatchError, match="must not change while it is served") as raised:
        for _ in conveyor.StreamingDataset([loader.addr], "images", batch_size=len(samples), shuffle="none"):
            pass
    assert os.path.basename(changed) in str(raised.value)


def test_webdataset_shards_serve_each_member_as_written_and_cls_as_its_class(tmp_path, start_loader):
    import json
    import subprocess

    import webdataset as wds

    from conftest import binary

    rng = np.random.default_rng(9)
    written = {}
    os.makedirs(tmp_path / "shards")
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / "shards" / f"train-{shard:04d}.tar")) as sink:
            for j in range(5 + shard):
                key = f"s{shard}_{j:03d}"
                image = rng.integers(0, 256, size=int(rng.integers(10, 3000)), dtype=np.uint8).tobytes()
                meta = {"shard": shard, "j": j}
                sink.write({"__key__": key, "jpg": image, "cls": shard * 100 + j, "json": meta})
                written[key] = (image, shard * 100 + j, json.dumps(meta).encode())
    loader = start_loader({"wds": tmp_path / "shards"})
    info = conveyor.datasets([loader.addr])["wds"]
    assert info.num_samples == len(written) == 18
    assert info.fields == {"cls": (np.dtype(np.int64), ()), "jpg": (np.dtype(np.uint8), (None,)),
                           "json": (np.dtype(np.uint8), (None,))}
    # Samples are numbered in shard order, then in member order within a shard.
    keys = sorted(written)
    ds = conveyor.StreamingDataset([loader.addr], "wds", batch_size=5, shuffle="full", seed=2)
    seen = []
    for batch in ds:
        for position, i in enumerate(batch["__index__"]):
            image, label, meta = written[keys[i]]
            assert batch["jpg"].tolist()[position] == image
            assert batch["cls"][position] == label
            assert batch["json"].tolist()[position] == meta.decode(), "text members arrive as str"
            assert batch["json"].utf8 and not batch["jpg"].utf8
            seen.append(int(i))
    assert sorted(seen) == list(range(18))

    # A sample without a member the others have stops the loader naming the shard and sample.
    with wds.TarWriter(str(tmp_path / "shards" / "train-0003.tar")) as sink:
        sink.write({"__key__": "lonely", "jpg": b"\xff\xd8"})
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset",
                             f"wds={tmp_path / 'shards'}"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "train-0003.tar" in result.stderr and "sample 'lonely' has no 'cls' member" in result.stderr, result.stderr


def test_webdataset_brace_patterns_name_the_shards_and_a_block_shuffle_reads_one_shard_at_a_time(
        tmp_path, start_loader):
    import subprocess

    import webdataset as wds

    from conftest import binary

    os.makedirs(tmp_path / "shards")
    with wds.ShardWriter(str(tmp_path / "shards" / "part-%06d.tar"), maxcount=6, verbose=0) as sink:
        for j in range(27):
            sink.write({"__key__": f"k{j:03d}", "txt": f"sample {j}", "cls": j})
    # Only the first four of the five shards, by a pattern as webdataset users write them.
    pattern = str(tmp_path / "shards" / "part-{000000..000003}.tar")
    loader = start_loader({"wds": pattern})
    info = conveyor.datasets([loader.addr])["wds"]
    assert info.num_samples == 24
    ds = conveyor.StreamingDataset([loader.addr], "wds", batch_size=6, shuffle="block", shuffle_window=1, seed=5)
    shards_seen = []
    for batch in ds:
        shard = {int(i) // 6 for i in batch["__index__"]}
        assert len(shard) == 1, f"one shard per batch in a block shuffle: {batch['__index__']}"
        assert batch["txt"].tolist() == [f"sample {int(i)}" for i in batch["__index__"]]
        shards_seen += shard
    assert sorted(shards_seen) == [0, 1, 2, 3]
    # A pattern naming a shard that is not there stops the loader naming it.
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset",
                             f"wds={tmp_path / 'shards' / 'part-{000003..000007}.tar'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "part-000005.tar" in result.stderr, result.stderr


def test_webdataset_npy_members_arrive_as_ragged_arrays(tmp_path, start_loader):
    import subprocess

    import webdataset as wds

    from conftest import binary

    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / "shards")
    arrays = []
    with wds.TarWriter(str(tmp_path / "shards" / "eeg-0000.tar")) as sink:
        for j in range(9):
            # Recordings of different lengths: [time, 3 channels] float32, as np.save writes them.
            array = rng.standard_normal((int(rng.integers(1, 40)), 3)).astype(np.float32)
            sink.write({"__key__": f"r{j:02d}", "npy": array, "cls": j})
            arrays.append(array)
    loader = start_loader({"eeg": tmp_path / "shards"})
    info = conveyor.datasets([loader.addr])["eeg"]
    assert info.fields["npy"] == (np.dtype(np.float32), (None, 3))
    seen = 0
    for batch in conveyor.StreamingDataset([loader.addr], "eeg", batch_size=4, shuffle="full", seed=1):
        samples = batch["npy"].tolist()
        for row, index in enumerate(batch["__index__"]):
            np.testing.assert_array_equal(samples[row], arrays[index])
            assert batch["cls"][row] == index
            seen += 1
    assert seen == 9

    # Arrays whose rows differ in shape are refused by name.
    with wds.TarWriter(str(tmp_path / "shards" / "eeg-0001.tar")) as sink:
        sink.write({"__key__": "odd", "npy": np.zeros((5, 4), np.float32), "cls": 0})
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset",
                             f"eeg={tmp_path / 'shards'}"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "member 'odd.npy' has rows of float32[4]" in result.stderr, result.stderr
