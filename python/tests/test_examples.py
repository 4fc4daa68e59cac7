"""The examples run as their docstrings say: a plain PyTorch script that is interrupted and
resumed, and the same script under torchrun with two CPU ranks."""

import os
import subprocess
import sys

import numpy as np
import pytest

import conveyor
from conftest import binary

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_chess.py")


@pytest.fixture
def chess(tmp_path, start_loader):
    subprocess.run([binary("trainer-client"), "write-demo-data", "--dir", str(tmp_path / "chess"), "--samples", "4000"],
                   check=True, capture_output=True)
    return start_loader({"chess": tmp_path / "chess"})


def logged(path):
    return np.frombuffer(open(path, "rb").read(), dtype="<i8")


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pytorch_example_resumes_model_and_stream_exactly(tmp_path, chess, workers):
    """Interrupted in epoch 1 of 2 and resumed: both runs together train on each epoch once, in
    order; with 2 workers through torchdata's StatefulDataLoader."""
    pytest.importorskip("torch")
    if workers:
        pytest.importorskip("torchdata.stateful_dataloader")
    common = [sys.executable, EXAMPLE, "--loader", chess.addr, "--epochs", "2", "--batch-size", "100", "--seed", "3",
              "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "5", "--device", "cpu",
              "--workers", str(workers)]
    first = subprocess.run(common + ["--max-batches", "57", "--indices-log", str(tmp_path / "first.bin")],
                           check=True, capture_output=True, text=True)
    assert "stopped after 57 batches" in first.stdout
    second = subprocess.run(common + ["--indices-log", str(tmp_path / "rest.bin")], check=True, capture_output=True,
                            text=True)
    assert "resuming at epoch 1 batch 17" in second.stdout, second.stdout
    ds = conveyor.StreamingDataset([chess.addr], "chess", batch_size=100, seed=3)
    epochs = np.concatenate([b["__index__"] for b in ds] + [b["__index__"] for b in ds])
    both = np.concatenate([logged(tmp_path / "first.bin"), logged(tmp_path / "rest.bin")])
    assert np.array_equal(both, epochs), "the two runs together trained on each epoch once, in order"


def test_the_example_under_torchrun_gives_each_rank_its_half(tmp_path, chess):
    pytest.importorskip("torch")
    log = str(tmp_path / "rank-{rank}.bin")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          EXAMPLE, "--loader", chess.addr, "--epochs", "1", "--batch-size", "100", "--device", "cpu",
                          "--indices-log", log], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [logged(log.format(rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2000
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 4000


def test_the_jax_example_trains(tmp_path, chess):
    pytest.importorskip("jax")
    run = subprocess.run([sys.executable, os.path.join(os.path.dirname(EXAMPLE), "jax_linear.py"), "--loader",
                          chess.addr, "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in run.stdout.splitlines() if "mean loss" in line]
    assert len(losses) == 3 and losses[2] < losses[0], run.stdout


TRANSFORMS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                          "transforms")


def test_the_transform_examples_serve_augmented_batches(tmp_path, start_loader):
    subprocess.run([sys.executable, os.path.join(TRANSFORMS, "write_data.py"), str(tmp_path), "--samples", "96"],
                   check=True, capture_output=True)
    images = np.load(tmp_path / "images" / "image.npy")
    loader = start_loader(
        {"images": tmp_path / "images", "eeg": tmp_path / "eeg"},
        "--pipeline", f"aug=images:@{TRANSFORMS}/image.pipeline",
        "--pipeline", f"windows=eeg:@{TRANSFORMS}/eeg.pipeline",
        "--transform", "aug_py=images:augment:image_augment", "--transform", "windows_py=eeg:augment:eeg_window",
        "--transform-pythonpath", TRANSFORMS, "--python", sys.executable, "--transform-shm-bytes", 64 << 20)
    catalog = conveyor.datasets([loader.addr])
    assert catalog["aug"].fields["image"] == catalog["aug_py"].fields["image"] == (np.dtype("<f4"), (3, 56, 56))
    assert catalog["windows"].fields["eeg"] == catalog["windows_py"].fields["eeg"] == (np.dtype("<f4"), (16, 200))
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    for name in ["aug", "aug_py", "windows", "windows_py"]:
        seen = 0
        for batch in conveyor.StreamingDataset([loader.addr], name, batch_size=32, seed=1):
            seen += len(batch["__index__"])
            if name != "aug_py":
                continue
            for row, index in enumerate(batch["__index__"][:8]):
                # The Python function's output is some crop and flip of its source image.
                original = (batch["image"][row] * std + mean) * 255
                candidates = [images[index, :, t:t + 56, l:l + 56] for t in range(9) for l in range(9)]
                candidates += [c[..., ::-1] for c in candidates]
                assert min(np.abs(original - c).max() for c in candidates) < 0.01, index
        assert seen == 96, name


IMAGES_EXAMPLE = os.path.join(os.path.dirname(EXAMPLE), "train_images.py")


def test_the_image_example_learns_from_loader_side_augmentation_and_resumes_exactly(tmp_path, start_loader):
    """The image classifier of the examples: its demo folder, the loader's decode + augmentation
    pipelines from its docstring, an interrupted and resumed run that trains on each epoch once,
    and a model that learns the two classes."""
    pytest.importorskip("torch")
    subprocess.run([sys.executable, IMAGES_EXAMPLE, "--write-demo-images", str(tmp_path / "shapes")], check=True,
                   capture_output=True)
    doc = open(IMAGES_EXAMPLE).read()
    pipelines = [line.split("'")[1] for line in doc.splitlines() if line.strip().startswith("--pipeline '")]
    assert [p.split("=")[0] for p in pipelines] == ["train", "val"]
    loader = start_loader({"images": tmp_path / "shapes"}, *[a for p in pipelines for a in ("--pipeline", p)])
    common = [sys.executable, IMAGES_EXAMPLE, "--loader", loader.addr, "--epochs", "3", "--batch-size", "32",
              "--seed", "1", "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "4", "--device", "cpu"]
    first = subprocess.run(common + ["--max-batches", "10", "--indices-log", str(tmp_path / "first.bin")],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "stopped after 10 batches" in first.stdout, first.stderr[-2000:]
    second = subprocess.run(common + ["--indices-log", str(tmp_path / "rest.bin")], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming at epoch 1 batch 2" in second.stdout, second.stdout
    ds = conveyor.StreamingDataset([loader.addr], "train", batch_size=32, seed=1)
    epochs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        epochs += [b["__index__"] for b in ds]
    both = np.concatenate([logged(tmp_path / "first.bin"), logged(tmp_path / "rest.bin")])
    assert np.array_equal(both, np.concatenate(epochs)), "the two runs together trained on each epoch once, in order"
    accuracy = float(second.stdout.rsplit("accuracy on 'val': ", 1)[1].split()[0])
    assert accuracy >= 0.9, second.stdout
