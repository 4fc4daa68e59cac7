"""Resuming at another world size: a state_dict saved mid-epoch by W ranks resumes with W' ranks,
and the rest of the epoch reaches the new ranks exactly once, each rank getting as many batches."""

import numpy as np
import pytest

import conveyor

N = 103


@pytest.fixture
def loader(tmp_path, start_loader):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "label.npy", np.arange(N, dtype=np.int64))
    return start_loader({"d": tmp_path / "d"})


def ranks(loader, world_size, **kwargs):
    return [conveyor.StreamingDataset([loader.addr], "d", batch_size=4, shuffle="full", seed=11, rank=rank,
                                      world_size=world_size, drop_last=False, **kwargs) for rank in range(world_size)]


def take(ds, batches=None):
    """Labels of the first `batches` batches (all when None), and the state after them."""
    out = []
    for number, batch in enumerate(ds):
        out.extend(batch["label"].tolist())
        if batches is not None and number + 1 == batches:
            break
    return out, ds.state_dict()


@pytest.mark.parametrize("new_world", [2, 3, 6])
def test_a_state_from_four_ranks_resumes_the_epoch_with_another_number_of_ranks(loader, new_world):
    seen = []
    states = []
    for ds in ranks(loader, 4):
        taken, state = take(ds, 3)
        seen.extend(taken)
        states.append(state)
    assert len(seen) == 4 * 3 * 4
    resumed = ranks(loader, new_world)
    for ds in resumed:
        ds.load_state_dict(states[0])  # one rank's state serves every new rank
    lengths = {len(ds) for ds in resumed}
    assert len(lengths) == 1, f"every new rank gets as many batches: {lengths}"
    for ds in resumed:
        rest, _ = take(ds)
        assert len(rest) <= len(ds) * 4
        seen.extend(rest)
    assert set(seen) == set(range(N)), "the whole epoch"
    assert len(seen) - N < 4 + new_world, "repeats are the split's padding only"
    # The next epoch is split among the new ranks from its start: the same as a fresh run there.
    fresh = ranks(loader, new_world)
    for ds, new in zip(fresh, resumed):
        ds.set_epoch(1)
        assert take(new)[0] == take(ds)[0]


def test_a_state_resumes_twice_at_different_world_sizes_within_one_epoch(loader):
    seen = []
    first = ranks(loader, 4)
    for ds in first:
        seen.extend(take(ds, 2)[0])
    state = first[0].state_dict()
    second = ranks(loader, 3)
    states = []
    for ds in second:
        ds.load_state_dict(state)
        taken, later = take(ds, 2)
        seen.extend(taken)
        states.append(later)
    third = ranks(loader, 5)
    for ds in third:
        ds.load_state_dict(states[1])
        seen.extend(take(ds)[0])
    assert set(seen) == set(range(N))
    assert len(seen) - N < 3 + 5 + 4


def test_the_same_world_size_resumes_each_rank_from_any_ranks_state(loader):
    whole = [take(ds)[0] for ds in ranks(loader, 2)]
    first = ranks(loader, 2)
    parts = [take(ds, 5)[0] for ds in first]
    state = first[0].state_dict()
    again = ranks(loader, 2)
    for rank, ds in enumerate(again):
        ds.load_state_dict(state)
        assert parts[rank] + take(ds)[0] == whole[rank], "rank's own stream, continued"


def test_the_cli_resumes_a_cursor_at_another_world_size(loader, tmp_path):
    import subprocess

    from conftest import binary

    def stream(rank, world, *extra):
        out = tmp_path / f"dump-{world}-{rank}-{len(list(tmp_path.iterdir()))}"
        subprocess.run([binary("trainer-client"), "stream", "--loader", loader.addr, "--rank", str(rank),
                        "--world-size", str(world), "--dump", str(out), *map(str, extra)],
                       check=True, capture_output=True, timeout=120)
        return np.load(out / "__indices__.npy").tolist()

    seen = []
    for rank in range(4):
        seen += stream(rank, 4, "--dataset", "d", "--batch-size", 4, "--seed", 3, "--max-batches", 2,
                       "--save-cursor", tmp_path / f"cursor-{rank}.json")
    for rank in range(3):
        seen += stream(rank, 3, "--resume-from", tmp_path / "cursor-0.json", "--save-cursor", tmp_path / f"c3-{rank}")
    assert set(seen) == set(range(N)) and len(seen) - N < 4 + 3
    result = subprocess.run([binary("trainer-client"), "stream", "--loader", loader.addr, "--world-size", "3",
                             "--resume-from", tmp_path / "cursor-0.json"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "give this process's --rank too" in result.stderr, result.stderr
