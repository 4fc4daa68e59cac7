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


def test_the_pytorch_example_resumes_model_and_stream_exactly(tmp_path, chess):
    pytest.importorskip("torch")
    common = [sys.executable, EXAMPLE, "--loader", chess.addr, "--epochs", "1", "--batch-size", "100", "--seed", "3",
              "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "5", "--device", "cpu"]
    first = subprocess.run(common + ["--max-batches", "17", "--indices-log", str(tmp_path / "first.bin")],
                           check=True, capture_output=True, text=True)
    assert "stopped after 17 batches" in first.stdout
    second = subprocess.run(common + ["--indices-log", str(tmp_path / "rest.bin")], check=True, capture_output=True,
                            text=True)
    assert "resuming at epoch 0 batch 17" in second.stdout, second.stdout
    ds = conveyor.StreamingDataset([chess.addr], "chess", batch_size=100, seed=3)
    epoch = np.concatenate([b["__index__"] for b in ds])
    both = np.concatenate([logged(tmp_path / "first.bin"), logged(tmp_path / "rest.bin")])
    assert np.array_equal(both, epoch), "the two runs together trained on the epoch once, in order"


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
