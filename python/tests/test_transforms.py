"""Derived datasets against real loader processes: Python transforms in supervised worker
processes, and the built-in pipelines checked against numpy."""

import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import conveyor
from conftest import binary, free_port, metric, metrics

PYTHON = sys.executable


def write_images(path, n=120, seed=4):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 10, 12), dtype=np.uint8)
    np.save(os.path.join(path, "image.npy"), images)
    np.save(os.path.join(path, "label.npy"), np.arange(n, dtype=np.int64))
    return images


def write_module(tmp_path, name, source):
    directory = tmp_path / "modules"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return directory


def python_args(modules, *extra):
    return ("--python", PYTHON, "--transform-pythonpath", modules, "--transform-shm-bytes", 16 << 20, *extra)


AUGMENT = """
    import numpy as np

    def augment(batch, indices, rng):
        image = batch["image"].astype(np.float32) / 255
        noise = rng.random(image.shape, dtype=np.float32)
        return {"image": image + noise, "label": batch["label"] * 10}
"""


def by_index(ds):
    out = {}
    for batch in ds:
        for row, index in enumerate(batch["__index__"]):
            assert index not in out, f"sample {index} twice"
            out[int(index)] = {k: v[row].copy() for k, v in batch.items() if k != "__index__"}
    return out


def test_a_python_transform_gives_the_same_bytes_from_every_replica_and_after_a_kill(tmp_path, start_loader):
    images = write_images(tmp_path / "d")
    modules = write_module(tmp_path, "aug", AUGMENT)
    args = python_args(modules, "--transform", "a=d:aug:augment")
    one, two = start_loader({"d": tmp_path / "d"}, *args), start_loader({"d": tmp_path / "d"}, *args)

    info = conveyor.datasets([one.addr])["a"]
    assert info.derivation == "d | python aug:augment"
    assert info.fields["image"] == (np.dtype("<f4"), (3, 10, 12))

    settings = dict(batch_size=8, shuffle="full", seed=5)
    first = by_index(conveyor.StreamingDataset([one.addr], "a", **settings))
    second = by_index(conveyor.StreamingDataset([two.addr], "a", **settings))
    assert sorted(first) == list(range(120))
    for index, sample in first.items():
        assert np.array_equal(sample["label"], index * 10)
        noise = sample["image"] - images[index].astype(np.float32) / 255
        assert noise.min() >= 0 and noise.max() < 1, "the function ran on the right rows"
        assert sample["image"].tobytes() == second[index]["image"].tobytes(), f"sample {index} differs between replicas"

    # Another epoch draws other noise; the same epoch through both replicas, one of them killed
    # half-way, gives the same bytes as one replica alone (retried batches are recomputed).
    ds = conveyor.StreamingDataset([one.addr], "a", **settings)
    ds.set_epoch(1)
    epoch1 = by_index(ds)
    assert any(epoch1[i]["image"].tobytes() != first[i]["image"].tobytes() for i in first)
    both = conveyor.StreamingDataset([one.addr, two.addr], "a", prefetch=2, **settings)
    both.set_epoch(1)
    seen = {}
    for number, batch in enumerate(both):
        if number == 3:
            one.kill()
        for row, index in enumerate(batch["__index__"]):
            assert int(index) not in seen
            seen[int(index)] = batch["image"][row].tobytes()
    assert sorted(seen) == list(range(120))
    assert all(seen[i] == epoch1[i]["image"].tobytes() for i in seen)


def test_an_exception_names_the_function_and_the_samples(tmp_path, start_loader):
    write_images(tmp_path / "d")
    modules = write_module(tmp_path, "boom", """
        def f(batch, indices, rng):
            if 77 in indices:
                raise ValueError("cannot parse sample 77")
            return {"image": batch["image"]}
    """)
    loader = start_loader({"d": tmp_path / "d"}, *python_args(modules, "--transform", "b=d:boom:f"))
    ds = conveyor.StreamingDataset([loader.addr], "b", batch_size=10, shuffle="none")
    with pytest.raises(conveyor.BatchError) as caught:
        for _ in ds:
            pass
    message = str(caught.value)
    assert "boom:f" in message and "ValueError: cannot parse sample 77" in message, message
    assert "indices 70, 71, 72" in message, message
    # The loader and its workers carry on: a batch without 77 still works.
    ds = conveyor.StreamingDataset([loader.addr], "b", batch_size=10, shuffle="none")
    assert next(iter(ds))["image"].shape == (10, 3, 10, 12)


def test_outputs_that_break_the_schema_are_named(tmp_path, start_loader):
    write_images(tmp_path / "d")
    modules = write_module(tmp_path, "drift", """
        import numpy as np

        def dtype(batch, indices, rng):
            x = batch["image"].astype(np.float32)
            return {"image": x.astype(np.float64) if 50 in indices else x}

        def rows(batch, indices, rng):
            return {"image": batch["image"][:-1] if 50 in indices else batch["image"]}

        def extra(batch, indices, rng):
            out = {"image": batch["image"]}
            if 50 in indices:
                out["more"] = batch["label"]
            return out

        def not_a_dict(batch, indices, rng):
            return batch["image"] if 50 in indices else {"image": batch["image"]}
    """)
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "dtype=d:drift:dtype", "--transform", "rows=d:drift:rows",
        "--transform", "extra=d:drift:extra", "--transform", "not_a_dict=d:drift:not_a_dict"))
    for name, expected in [("dtype", "output field 'image' float64[3, 10, 12] differs from the probe batch"),
                           ("rows", "output field 'image' has shape [9, 3, 10, 12]; it needs 10 rows"),
                           ("extra", "the output has a field 'more' that the probe batch at start-up did not have"),
                           ("not_a_dict", "the function returned ndarray; return a non-empty dict of numpy arrays")]:
        ds = conveyor.StreamingDataset([loader.addr], name, batch_size=10, shuffle="none")
        with pytest.raises(conveyor.BatchError, match=re.escape(expected)):
            for batch in ds:
                assert 50 not in batch["__index__"]


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_worker_allocating_past_its_cap_is_replaced_and_the_epoch_stays_exactly_once(tmp_path, start_loader):
    write_images(tmp_path / "d", n=200)
    modules = write_module(tmp_path, "leak", """
        import numpy as np
        kept = []

        def f(batch, indices, rng):
            kept.append(np.ones(24 << 20, dtype=np.uint8))  # 24 MiB more every batch, never freed
            return {"image": batch["image"], "label": batch["label"]}
    """)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "l=d:leak:f", "--transform-workers", 2,
        "--transform-worker-memory", 300 << 20, "--transform-max-batches", 0, "--metrics-listen", metrics_addr))
    for epoch in range(2):
        ds = conveyor.StreamingDataset([loader.addr], "l", batch_size=8, shuffle="full", seed=1)
        ds.set_epoch(epoch)
        seen = by_index(ds)
        assert sorted(seen) == list(range(200))
    text = metrics(metrics_addr)
    assert metric(text, "conveyor_loader_transform_worker_restarts_total", dataset="l", cause="memory") >= 2
    assert metric(text, "conveyor_loader_request_errors_total", kind="worker_failed") == 0
    assert metric(text, "conveyor_loader_transform_batches_total", dataset="l") == 50
    inside = metric(text, "conveyor_loader_transform_function_nanoseconds_total", dataset="l")
    assert 0 < inside < metric(text, "conveyor_loader_transform_nanoseconds_total", dataset="l")
    # The workers' leaks never reach the loader process.
    assert vm_rss(loader.proc.pid) < 150 << 20


def test_a_worker_that_segfaults_is_replaced_and_its_batch_retried(tmp_path, start_loader):
    write_images(tmp_path / "d", n=60)
    marker = tmp_path / "crashed-once"
    modules = write_module(tmp_path, "crash", f"""
        import ctypes, os

        def f(batch, indices, rng):
            if 42 in indices and not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                ctypes.string_at(0)  # SIGSEGV
            return {{"label": batch["label"]}}
    """)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "c=d:crash:f", "--metrics-listen", metrics_addr))
    seen = by_index(conveyor.StreamingDataset([loader.addr], "c", batch_size=8, shuffle="full", seed=3))
    assert sorted(seen) == list(range(60)) and all(seen[i]["label"] == i for i in seen)
    assert marker.exists()
    text = metrics(metrics_addr)
    assert metric(text, "conveyor_loader_transform_worker_restarts_total", dataset="c", cause="crashed") == 1
    assert metric(text, "conveyor_loader_request_errors_total", kind="worker_failed") == 0


def test_a_hanging_function_hits_the_timeout_and_workers_are_recycled(tmp_path, start_loader):
    write_images(tmp_path / "d", n=40)
    modules = write_module(tmp_path, "slow", """
        import time

        def f(batch, indices, rng):
            if 33 in indices:
                time.sleep(600)
            return {"image": batch["image"]}
    """)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "h=d:slow:f", "--transform-timeout", "1s", "--transform-max-batches", 2,
        "--metrics-listen", metrics_addr))
    ds = conveyor.StreamingDataset([loader.addr], "h", batch_size=10, shuffle="none")
    with pytest.raises(conveyor.BatchError) as caught:
        for batch in ds:
            assert 33 not in batch["__index__"]
    message = str(caught.value)
    assert "no answer within --transform-timeout" in message and "on a fresh worker" in message, message
    text = metrics(metrics_addr)
    # Three attempts by the client, each tried twice by the loader.
    assert metric(text, "conveyor_loader_transform_worker_restarts_total", dataset="h", cause="timeout") == 6
    assert metric(text, "conveyor_loader_transform_worker_restarts_total", dataset="h", cause="recycled") >= 1


def alive(pid):
    """Whether process `pid` runs (a zombie does not count)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or between the open and the read (ESRCH).
        return False
    return state != "Z"


def wait_gone(pids, what, seconds=10):
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{what}: {[p for p in pids if alive(p)]} still running"


def test_processes_a_function_starts_end_with_its_worker_and_with_the_loader(tmp_path, start_loader):
    write_images(tmp_path / "d", n=40)
    pids = tmp_path / "pids"
    pids.mkdir()
    modules = write_module(tmp_path, "forks", f"""
        import os, time

        def f(batch, indices, rng):
            if os.fork() == 0:  # a helper the function leaves behind, holding the worker's sockets
                open(os.path.join({str(pids)!r}, str(os.getpid())), "w").close()
                time.sleep(600)
                os._exit(0)
            return {{"label": batch["label"]}}
    """)
    loader = start_loader({"d": tmp_path / "d"}, *python_args(modules, "--transform", "k=d:forks:f"))
    seen = by_index(conveyor.StreamingDataset([loader.addr], "k", batch_size=10, shuffle="none"))
    assert sorted(seen) == list(range(40))
    deadline = time.monotonic() + 10
    while len(os.listdir(pids)) < 4:
        assert time.monotonic() < deadline, "every batch's helper started"
    helpers = [int(name) for name in os.listdir(pids)]
    assert any(alive(pid) for pid in helpers)
    loader.proc.terminate()  # SIGTERM: the loader drains and exits
    loader.proc.wait(timeout=30)
    wait_gone(helpers, "helpers left after the loader's SIGTERM")


def test_a_worker_that_exits_while_its_helper_keeps_the_socket_is_replaced_at_once(tmp_path, start_loader):
    write_images(tmp_path / "d", n=40)
    marker = tmp_path / "exited-once"
    modules = write_module(tmp_path, "quits", f"""
        import os, time

        def f(batch, indices, rng):
            if 23 in indices and not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                if os.fork() == 0:
                    time.sleep(600)
                os._exit(3)  # the worker goes; its helper keeps the control socket open
            return {{"label": batch["label"]}}
    """)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "q=d:quits:f", "--transform-timeout", "60s", "--metrics-listen", metrics_addr))
    started = time.monotonic()
    seen = by_index(conveyor.StreamingDataset([loader.addr], "q", batch_size=10, shuffle="none"))
    assert sorted(seen) == list(range(40)) and all(seen[i]["label"] == i for i in seen)
    assert time.monotonic() - started < 20, "noticed long before --transform-timeout (60 s)"
    assert metric(metrics(metrics_addr), "conveyor_loader_transform_worker_restarts_total", dataset="q",
                  cause="crashed") == 1


def test_a_stray_write_on_the_control_socket_cannot_pair_a_batch_with_another_batchs_rows(tmp_path, start_loader):
    write_images(tmp_path / "d", n=60)
    marker = tmp_path / "wrote-once"
    modules = write_module(tmp_path, "stray", f"""
        import json, os, stat, struct

        def f(batch, indices, rng):
            if 25 in indices and not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                # A reply the loader did not ask for, written on the worker's control socket.
                fake = json.dumps({{"status": "error", "message": "not this batch's answer"}}).encode()
                for fd in range(3, 64):
                    try:
                        if stat.S_ISSOCK(os.fstat(fd).st_mode):
                            os.write(fd, struct.pack("<I", len(fake)) + fake)
                    except OSError:
                        pass
            return {{"label": batch["label"] * 2}}
    """)
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"d": tmp_path / "d"}, *python_args(
        modules, "--transform", "s=d:stray:f", "--metrics-listen", metrics_addr))
    seen = by_index(conveyor.StreamingDataset([loader.addr], "s", batch_size=10, shuffle="none"))
    assert marker.exists()
    assert sorted(seen) == list(range(60))
    assert all(seen[i]["label"] == 2 * i for i in seen), "every row is its own batch's"
    assert metric(metrics(metrics_addr), "conveyor_loader_transform_worker_restarts_total", dataset="s",
                  cause="crashed") == 1


def test_clients_can_only_request_what_the_loader_was_configured_with(tmp_path, start_loader):
    write_images(tmp_path / "d", n=20)
    marker = tmp_path / "ran"
    modules = write_module(tmp_path, "evil", f"""
        def touch(batch, indices, rng):
            open({str(marker)!r}, "w").close()
            return {{"image": batch["image"]}}

        def fine(batch, indices, rng):
            return {{"image": batch["image"]}}
    """)
    loader = start_loader({"d": tmp_path / "d"}, *python_args(modules, "--transform", "ok=d:evil:fine"))
    assert sorted(conveyor.datasets([loader.addr])) == ["d", "ok"]
    for name in ["evil:touch", "d:evil:touch", "ok=d:evil:touch", "os:system"]:
        with pytest.raises(conveyor.ConveyorError, match="unknown dataset"):
            conveyor.StreamingDataset([loader.addr], name, batch_size=4)
    assert not marker.exists()


@pytest.mark.parametrize("flags, expected", [
    (("--transform", "x=d:no_such_module:f"), "cannot load no_such_module:f: ModuleNotFoundError"),
    (("--transform", "x=d:evil2:missing"), "cannot load evil2:missing: AttributeError"),
    (("--transform", "x=nope:evil2:f"), "no stored dataset 'nope'"),
    (("--transform", "x=d:evil2:raises"), "evil2:raises raised on the probe batch (samples [0, 1, 2, 3]): KeyError"),
    (("--transform", "x=d:evil2:f", "--transform-worker-memory", 50 << 20), "over --transform-worker-memory"),
    (("--pipeline", "x=d:image: random_crop(10, 13)"), "size 13 is larger than axis 2"),
    (("--pipeline", "x=d:imag: flip()"), "no field 'imag'; its fields are 'image', 'label'"),
    (("--transform", "x=d:evil2:escape"), 'field name "../../x" cannot be served: it holds a path separator'),
    (("--transform", "x=d:evil2:shadow"), 'field name "__index__" cannot be served'),
])
def test_start_up_refuses_transforms_that_cannot_work(tmp_path, flags, expected):
    write_images(tmp_path / "d", n=20)
    modules = write_module(tmp_path, "evil2", """
        def f(batch, indices, rng):
            return {"image": batch["image"]}

        def raises(batch, indices, rng):
            return {"image": batch["nope"]}

        def escape(batch, indices, rng):
            return {"../../x": batch["image"]}

        def shadow(batch, indices, rng):
            return {"__index__": batch["label"]}
    """)
    result = subprocess.run(
        [binary("loader-server"), "--listen", "127.0.0.1:0", "--dataset", f"d={tmp_path / 'd'}",
         *map(str, python_args(modules, *flags))], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


# The built-in operators, checked against numpy on random inputs.

def round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def test_the_image_pipeline_matches_numpy_and_draws_every_crop_and_both_flips(tmp_path, start_loader):
    images = write_images(tmp_path / "d", n=400)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pipeline = (f"image: random_crop(8, 9) | flip(axis=-1, p=0.5) | cast(float32, scale=1/255) | "
                f"normalize(mean={mean}, std={std})")
    loader = start_loader({"d": tmp_path / "d"}, "--pipeline", f"p=d:{pipeline}")
    info = conveyor.datasets([loader.addr])["p"]
    assert info.fields["image"] == (np.dtype("<f4"), (3, 8, 9))
    got = by_index(conveyor.StreamingDataset([loader.addr], "p", batch_size=32, shuffle="full", seed=2))
    again = by_index(conveyor.StreamingDataset([loader.addr], "p", batch_size=7, shuffle="none", seed=2))
    m = np.array(mean)[:, None, None]
    inv = 1 / np.array(std)[:, None, None]
    offsets, flips = set(), set()
    for index, sample in got.items():
        assert sample["label"] == index
        assert sample["image"].tobytes() == again[index]["image"].tobytes(), "a sample's augmentation ignores its batch"
        matches = []
        for top in range(3):
            for left in range(4):
                crop = images[index, :, top:top + 8, left:left + 9]
                for flip in (False, True):
                    x = crop[:, :, ::-1] if flip else crop
                    scaled = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
                    want = ((scaled.astype(np.float64) - m) * inv).astype(np.float32)
                    if want.tobytes() == sample["image"].tobytes():
                        matches.append((top, left, flip))
        assert matches, f"sample {index} is no crop/flip of its source"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert offsets == {(t, l) for t in range(3) for l in range(4)}
    assert flips == {False, True}


def test_window_centre_crop_cast_and_clip_match_numpy(tmp_path, start_loader):
    rng = np.random.default_rng(11)
    os.makedirs(tmp_path / "e")
    eeg = rng.standard_normal((60, 4, 50)).astype(np.float32) * 100
    counts = rng.integers(-40000, 40000, size=(60, 5), dtype=np.int32)
    np.save(tmp_path / "e" / "eeg.npy", eeg)
    np.save(tmp_path / "e" / "counts.npy", counts)
    pipeline = ("eeg: random_window(20) | center_crop(2, 20) | clip(min=-50, max=50.5); "
                "counts: cast(int16, scale=1.5, offset=0.5) | clip(min=-1000, max=30000)")
    loader = start_loader({"e": tmp_path / "e"}, "--pipeline", f"w=e:{pipeline}")
    got = by_index(conveyor.StreamingDataset([loader.addr], "w", batch_size=16, shuffle="full", seed=8))
    starts = set()
    for index, sample in got.items():
        window = sample["eeg"]
        assert window.shape == (2, 20) and window.dtype == np.float32
        hits = [s for s in range(31)
                if np.clip(eeg[index, 1:3, s:s + 20], -50, 50.5).astype(np.float32).tobytes() == window.tobytes()]
        assert hits, f"sample {index}: no window matches"
        starts.add(hits[0])
        scaled = round_half_away(counts[index].astype(np.float64) * 1.5 + 0.5)
        want = np.clip(np.clip(scaled, -32768, 32767), -1000, 30000).astype(np.int16)
        assert sample["counts"].tobytes() == want.tobytes(), index
    assert len(starts) > 15, f"windows start at few places: {sorted(starts)}"


def test_a_pipeline_files_comments_are_not_published_in_its_derivation(tmp_path, start_loader):
    write_images(tmp_path / "d", n=20)
    (tmp_path / "aug.pipeline").write_text("# tuned on the private set at /secret/path\nimage: flip(axis=-1, p=1)\n"
                                           "  # a second note\n")
    loader = start_loader({"d": tmp_path / "d"}, "--pipeline", f"a=d:@{tmp_path / 'aug.pipeline'}")
    info = conveyor.datasets([loader.addr])["a"]
    assert info.derivation == "d | pipeline image: flip(axis=-1, p=1)", info.derivation


# Python transforms over ragged fields: they receive a Ragged and may return one.

RAGGED = """
    import numpy as np

    def tokens(batch, indices, rng):
        text = batch["txt"]
        assert type(text).__name__ == "Ragged" and text.utf8 and len(text) == len(indices)
        words = [t.split() for t in text.tolist()]
        pairs = batch["npy"]
        return {
            "ids": [np.array([len(w) for w in ws], dtype=np.int32) for ws in words],  # a list of arrays
            "upper": [t.upper() for t in text.tolist()],  # a list of str
            "num_words": np.array([len(ws) for ws in words], dtype=np.int64),
            "pairs": type(pairs)(pairs.values * 2, pairs.offsets),  # a Ragged
        }

    def bad_offsets(batch, indices, rng):
        pairs = batch["npy"]
        offsets = pairs.offsets.copy()
        if 7 in indices:
            offsets[1], offsets[2] = offsets[2] + 1, offsets[1]
        return {"pairs": type(pairs)(pairs.values, offsets)}
"""


def write_text_shards(path, n=40):
    """WebDataset shards: a `.txt` caption (text) and a `.npy` array of int16 pairs per sample."""
    import webdataset as wds

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(6)
    texts = [" ".join("wörd"[: int(rng.integers(1, 5))] for _ in range(int(rng.integers(0, 6)))) for _ in range(n)]
    pairs = [rng.integers(-50, 50, size=(int(rng.integers(0, 4)), 2)).astype(np.int16) for _ in range(n)]
    with wds.TarWriter(str(path / "train-0000.tar")) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{i:04d}", "txt": texts[i], "npy": pairs[i]})
    return texts, pairs


def test_a_python_transform_takes_ragged_fields_and_returns_ragged_and_fixed_ones(tmp_path, start_loader):
    texts, pairs = write_text_shards(tmp_path / "shards")
    modules = write_module(tmp_path, "ragged_fns", RAGGED)
    args = python_args(modules, "--transform", "tok=w:ragged_fns:tokens", "--transform", "bad=w:ragged_fns:bad_offsets")
    a = start_loader({"w": tmp_path / "shards"}, *args)
    b = start_loader({"w": tmp_path / "shards"}, *args)
    info = conveyor.datasets([a.addr])["tok"]
    assert info.fields == {"ids": (np.dtype(np.int32), (None,)), "num_words": (np.dtype(np.int64), ()),
                           "pairs": (np.dtype(np.int16), (None, 2)), "upper": (np.dtype(np.uint8), (None,))}

    def check(ds, kill=None):
        seen = set()
        for number, batch in enumerate(ds):
            if number == 1 and kill:
                kill()
            assert isinstance(batch["ids"], conveyor.Ragged) and batch["upper"].utf8
            for row, i in enumerate(batch["__index__"].tolist()):
                words = texts[i].split()
                np.testing.assert_array_equal(batch["ids"][row], [len(w) for w in words])
                assert batch["upper"].tolist()[row] == texts[i].upper()
                assert batch["num_words"][row] == len(words)
                np.testing.assert_array_equal(batch["pairs"][row], pairs[i] * 2)
                assert i not in seen
                seen.add(i)
        assert seen == set(range(len(texts)))

    check(conveyor.StreamingDataset([a.addr], "tok", batch_size=6, shuffle="full", seed=2))
    # Two replicas, one killed after the first batch: the same bytes, every sample once.
    check(conveyor.StreamingDataset([a.addr, b.addr], "tok", batch_size=6, shuffle="full", seed=2, prefetch=2),
          kill=a.kill)

    # Offsets a function gets wrong fail its batch by name; the loader serves on.
    ds = conveyor.StreamingDataset([b.addr], "bad", batch_size=10, shuffle="none", prefetch=1)
    with pytest.raises(conveyor.BatchError, match=r"ragged output field 'pairs': offsets\[1\] = \d+ is above"):
        for batch in ds:
            assert 7 not in batch["__index__"]
    assert b.proc.poll() is None
