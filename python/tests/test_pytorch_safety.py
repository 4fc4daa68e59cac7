"""Ordinary PyTorch code around a StreamingDataset never loses or repeats a sample silently:
errors in DataLoader workers reach the training loop, positions that cannot be known are refused,
re-batching DataLoaders are refused, and a constructor waiting for loaders can be interrupted."""

import pickle
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import conveyor
from conftest import interrupt_when_blocked, write_chess_like
from test_transforms import python_args, write_images, write_module

torch = pytest.importorskip("torch")

EXCEPTIONS = [conveyor.ConveyorError, conveyor.LoaderUnavailableError, conveyor.UnknownDatasetError,
              conveyor.InvalidSettingsError, conveyor.BatchError, conveyor.AuthenticationError]


@pytest.mark.parametrize("kind", EXCEPTIONS, ids=lambda k: k.__name__)
def test_every_exception_is_importable_from_conveyor_and_survives_pickling(kind):
    assert kind.__module__ == "conveyor" and getattr(conveyor, kind.__name__) is kind
    error = kind("loader 127.0.0.1:9 refused: reasons")
    error.replica = "127.0.0.1:9"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind and str(copy) == str(error) and copy.replica == "127.0.0.1:9"
    assert issubclass(kind, conveyor.ConveyorError)


def dataloader(kind, ds, **kwargs):
    if kind == "stateful":
        stateful = pytest.importorskip("torchdata.stateful_dataloader")
        return stateful.StatefulDataLoader(ds, batch_size=None, **kwargs)
    return torch.utils.data.DataLoader(ds, batch_size=None, **kwargs)


@pytest.mark.parametrize("kind", ["plain", "stateful"])
def test_the_only_loader_killed_mid_epoch_raises_in_the_training_loop(tmp_path, start_loader, kind):
    write_chess_like(tmp_path / "c", 20_000)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=100, prefetch=2, request_timeout=2.0,
                                   unavailable_timeout=2.0)
    batches = 0
    with pytest.raises(conveyor.LoaderUnavailableError, match=r"no loader was reachable for 2.0s \(unavailable_timeout\)"):
        for batch in dataloader(kind, ds, num_workers=2):
            batches += 1
            if batches == 5:
                loader.kill()
    assert 5 <= batches < len(ds) == 200, "the loop ended by an exception, not as if the epoch were over"


@pytest.mark.parametrize("kind", ["plain", "stateful"])
def test_a_transform_that_raises_fails_the_training_loop_under_workers(tmp_path, start_loader, kind):
    write_images(tmp_path / "d", n=200)
    modules = write_module(tmp_path, "bad", """
        def f(batch, indices, rng):
            if 150 in indices:
                raise ValueError("cannot decode sample 150")
            return {"image": batch["image"]}
    """)
    loader = start_loader({"d": tmp_path / "d"}, *python_args(modules, "--transform", "t=d:bad:f"))
    ds = conveyor.StreamingDataset([loader.addr], "t", batch_size=10, shuffle="none")
    seen = []
    with pytest.raises(conveyor.BatchError, match="cannot decode sample 150"):
        for batch in dataloader(kind, ds, num_workers=2):
            seen.append(batch["__index__"])
    assert len(seen) < 15 and all(150 not in s for s in seen)


def test_a_plain_dataloaders_workers_make_the_datasets_own_position_refuse(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 3000)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=100, seed=1)
    assert ds.state_dict()["next_batch"] == 0, "before any iteration the position is known"
    for i, _ in enumerate(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)):
        if i == 11:
            break
    with pytest.raises(conveyor.InvalidSettingsError, match="StatefulDataLoader"):
        ds.state_dict()
    with pytest.raises(conveyor.InvalidSettingsError, match="num_workers=0"):
        ds.stats()
    # Iterating in this process again makes the position its own.
    taken = [b["__index__"] for _, b in zip(range(4), ds)]
    state = ds.state_dict()
    assert state["next_batch"] == 4 and ds.stats()["batches"] == 4
    other = conveyor.StreamingDataset([loader.addr], "c", batch_size=100, seed=1)
    other.load_state_dict(state)
    rest = [b["__index__"] for b in other]
    whole = np.concatenate(taken + rest)
    assert len(whole) == 3000 and len(np.unique(whole)) == 3000


def test_set_epoch_after_load_state_dict_keeps_the_resume_point_for_the_same_epoch(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 2000)
    loader = start_loader({"c": tmp_path / "c"})

    def make():
        return conveyor.StreamingDataset([loader.addr], "c", batch_size=100, seed=5)

    ds = make()
    ds.set_epoch(1)
    full = [b["__index__"] for b in ds]
    ds.set_epoch(1)
    first = [b["__index__"] for _, b in zip(range(7), ds)]
    state = ds.state_dict()
    assert (state["epoch"], state["next_batch"]) == (1, 7)

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a loop that sets the epoch every time does
    assert resumed.state_dict()["next_batch"] == 7
    rest = [b["__index__"] for b in resumed]
    assert np.array_equal(np.concatenate(first + rest), np.concatenate(full)), "the rest of epoch 1, nothing twice"

    other = make()
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"set_epoch\(2\) after load_state_dict at epoch 1 batch 7"):
        other.set_epoch(2)
    assert other.state_dict()["epoch"] == 2 and other.state_dict()["next_batch"] == 0
    assert len([b for b in other]) == len(full)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_a_dataloader_that_would_rebatch_conveyors_batches_is_refused(tmp_path, start_loader, num_workers,
                                                                      batch_size):
    write_chess_like(tmp_path / "c", 1000)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=100)
    with pytest.raises(conveyor.InvalidSettingsError, match="batch_size=None"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)))
    # The fix named in the message works.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shapes = {tuple(b["board"].shape) for b in torch.utils.data.DataLoader(ds, batch_size=None,
                                                                               num_workers=num_workers)}
    assert shapes == {(100, 12, 8, 8)}


def test_the_constructor_gives_up_after_unavailable_timeout_naming_the_argument():
    started = time.monotonic()
    with pytest.raises(conveyor.LoaderUnavailableError) as caught:
        conveyor.StreamingDataset(["127.0.0.1:1"], "c", unavailable_timeout=2)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "(unavailable_timeout)" in message and "--unavailable-timeout" not in message, message


def test_ctrl_c_interrupts_a_constructor_waiting_for_loaders():
    script = textwrap.dedent("""
        import sys, conveyor
        print("connecting", flush=True)
        try:
            conveyor.StreamingDataset(["127.0.0.1:1"], "c", unavailable_timeout=600)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "connecting"
    sent = interrupt_when_blocked(child, "a loader")
    out, _ = child.communicate(timeout=10)
    assert out.strip() == "interrupted", out
    assert time.monotonic() - sent < 1, "Ctrl-C took too long"


def test_a_state_dict_naming_an_epoch_no_run_reaches_is_refused(tmp_path, start_loader):
    write_chess_like(tmp_path / "c", 500)
    loader = start_loader({"c": tmp_path / "c"})
    ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=100)
    for epoch, batch in [(2**64 - 1, 0), (-1, 0), (0, -3)]:
        state = dict(ds.state_dict(), epoch=epoch, next_batch=batch)
        with pytest.raises(conveyor.InvalidSettingsError, match="which no run reaches"):
            ds.load_state_dict(state)
    assert len(epoch_indices(ds)) == 500, "a refused state leaves the dataset as it was"


def epoch_indices(ds):
    return np.concatenate([batch["__index__"] for batch in ds])
