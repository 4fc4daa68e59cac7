"""Conveyor for Python training scripts: batches streamed from Conveyor loader servers.

The data workers run in the loader processes (other containers or hosts), not in the training
process: a loader that dies, is OOM-killed, added or removed does not stop training, and every
sample of an epoch still arrives exactly once, in an order fixed by (seed, epoch, rank).

    import conveyor
    ds = conveyor.StreamingDataset(loaders=["127.0.0.1:7070"], dataset="chess", batch_size=256)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in ds:          # {"board": array [256, 12, 8, 8], ..., "__index__": int64 [256]}
            ...
    state = ds.state_dict()       # save beside the model; ds.load_state_dict(state) resumes there

DataLoader workers are not needed (the loaders are the data workers). Where one is used, create it
with ``DataLoader(ds, batch_size=None, num_workers=k)`` (automatic batching is refused: it would
stack Conveyor's batches), and with workers take checkpoints from torchdata's
``StatefulDataLoader(ds, batch_size=None, num_workers=k).state_dict()``: the dataset's own
``state_dict()`` refuses once workers have iterated it. Errors raised in a worker reach the
training loop as the same ``conveyor`` exception.

The wheel also installs the loader and trainer binaries as ``conveyor-loader`` and
``conveyor-trainer``.

The sampling, dispatch, failover and exactly-once logic are the Rust client library's; this
package is a thin layer over it (``conveyor._native``).
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import struct
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _native
from ._ragged import Ragged as _RaggedBatch
from ._native import (
    AuthenticationError,
    BatchError,
    ConveyorError,
    InvalidSettingsError,
    LoaderUnavailableError,
    UnknownDatasetError,
)

__all__ = [
    "ArrayInfo",
    "AuthenticationError",
    "BatchError",
    "Coordinate",
    "ConveyorError",
    "DatasetInfo",
    "InvalidSettingsError",
    "LoaderUnavailableError",
    "Ragged",
    "StreamingDataset",
    "UnknownDatasetError",
    "datasets",
]

try:  # torch is optional: numpy alone works.
    import torch
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None
    _Base = object

INDEX_KEY = "__index__"
_SHUFFLES = ("none", "full", "block")
# The last epoch a run streams (the client library's Cursor::MAX_EPOCH).
_MAX_EPOCH = 2**62 - 1
_OUTPUTS = ("numpy", "torch")

# Native clients of this process. A forked child (DataLoader workers, torch.multiprocessing)
# inherits them without their runtime threads: it abandons them and connects anew.
_clients: "weakref.WeakSet[_native.Client]" = weakref.WeakSet()
_clients_lock = threading.Lock()


def _abandon_inherited_clients() -> None:
    for client in list(_clients):
        client.abandon()
    _clients.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_inherited_clients)


def _connect(loaders: Sequence[str], **options: Any) -> "_native.Client":
    client = _native.Client(list(loaders), **options)
    with _clients_lock:
        _clients.add(client)
    return client


class DatasetInfo(NamedTuple):
    """A dataset as the loaders describe it."""

    num_samples: int
    """Samples in the dataset."""
    fields: Dict[str, Tuple[np.dtype, Tuple[Optional[int], ...]]]
    """Per field: its numpy dtype and the shape of one sample. A ragged field (samples of
    different lengths) has ``None`` first: ``(None, 3)`` is a variable number of rows of 3,
    ``(None,)`` a variable number of values (bytes, for ``uint8``)."""
    derivation: str = ""
    """For a dataset the loaders derive with a transform: ``"SOURCE | pipeline ..."`` or
    ``"SOURCE | python module:function"``; empty for a stored dataset."""
    dimensions: Dict[str, Tuple[str, ...]] = {}
    """Per field: its dimension names, the sample dimension first, where the store names them
    (Zarr written by xarray); fields without names are left out."""
    coordinates: Dict[str, "ArrayInfo"] = {}
    """Coordinates of a Zarr group (xarray's dimension coordinates and those named in a
    ``coordinates`` attribute): described, not served."""
    variables: Dict[str, "ArrayInfo"] = {}
    """Data variables of a Zarr group that are not fields (not chosen with ``--fields``, or
    without the sample dimension first): described, not served; ``reason`` says why."""


class Ragged(_RaggedBatch):
    __doc__ = _RaggedBatch.__doc__
    __slots__ = ()

    def pad(self, length: Optional[int] = None, value: Any = 0) -> Tuple[np.ndarray, np.ndarray]:
        if length is not None and length < 0:
            raise InvalidSettingsError(f"pad(length={length}): give a length >= 0")
        return super().pad(length, value)

    pad.__doc__ = _RaggedBatch.pad.__doc__


class ArrayInfo(NamedTuple):
    """An array of a dataset's Zarr group that is not a field (an xarray coordinate, or a data
    variable the loaders do not serve), described from its metadata."""

    dtype: str
    """Its data type as the store writes it (``"float64"``, ``"<U4"``, ``"fixed_length_utf32"``).
    A datetime xarray encoded is an integer type; ``units`` then says what it counts."""
    shape: Tuple[int, ...]
    """Its full shape."""
    dimensions: Tuple[str, ...]
    """Its dimension names."""
    units: str = ""
    """The CF ``units`` attribute as written (``"days since 2000-01-01"``, ``"K"``); empty when
    absent."""
    calendar: str = ""
    """The CF ``calendar`` attribute (``"proleptic_gregorian"``); empty when absent."""
    reason: str = ""
    """Why it is not a field, and how to serve it where it can be."""


Coordinate = ArrayInfo
"""The name :class:`ArrayInfo` had when it described coordinates only."""


@functools.lru_cache(maxsize=None)  # a dozen codes; called per field of every batch
def _numpy_dtype(code: str) -> np.dtype:
    return np.dtype(("|" if code[1:] == "1" else "<") + code)


_SECURITY_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "tls_domain", "auth_token", "auth_token_file")


def _security(options: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(options) - set(_SECURITY_OPTIONS)
    if unknown:
        raise InvalidSettingsError(f"unknown option(s) {sorted(unknown)}; the TLS and token options are {_SECURITY_OPTIONS}")
    # Every key, None where not given: the native layer reads them as one settings object.
    return {
        k: (os.fspath(v) if v is not None and k not in ("tls_domain", "auth_token") else v)
        for k, v in ((k, options.get(k)) for k in _SECURITY_OPTIONS)
    }


def datasets(loaders: Sequence[str], unavailable_timeout: float = 10.0, **security: Any) -> Dict[str, DatasetInfo]:
    """The datasets the loaders serve: ``{name: DatasetInfo(num_samples, fields)}``.

    Takes the TLS and token options of :class:`StreamingDataset`. Raises LoaderUnavailableError
    when no loader answers within ``unavailable_timeout`` seconds, AuthenticationError when every
    loader refuses the credentials.
    """
    _check_loaders(loaders)
    catalog = json.loads(_native.datasets(list(loaders), float(unavailable_timeout), _security(security)))
    return {d["name"]: _info(d) for d in catalog}


def _info(entry: Dict[str, Any]) -> DatasetInfo:
    fields = {
        f["name"]: (_numpy_dtype(f["dtype"]), ((None,) if f.get("ragged") else ()) + tuple(f["sample_shape"]))
        for f in entry["fields"]
    }
    dimensions = {f["name"]: tuple(f["dimension_names"]) for f in entry["fields"] if f.get("dimension_names")}
    described: Dict[str, Dict[str, ArrayInfo]] = {"coordinate": {}, "variable": {}}
    for c in entry.get("coordinates", []):
        # Loaders that predate `role` described coordinates only.
        described["variable" if c.get("role") == "variable" else "coordinate"][c["name"]] = ArrayInfo(
            c["dtype"], tuple(c["shape"]), tuple(c["dimension_names"]),
            c.get("units", ""), c.get("calendar", ""), c.get("reason", ""))
    return DatasetInfo(entry["num_samples"], fields, entry.get("derivation", ""), dimensions,
                       described["coordinate"], described["variable"])


def _check_loaders(loaders: Any) -> None:
    if isinstance(loaders, str) or not all(isinstance(a, str) for a in loaders) or not loaders:
        raise InvalidSettingsError(
            f"loaders={loaders!r}: give a list of 'host:port' strings, e.g. loaders=['127.0.0.1:7070']"
        )


def _default_rank_and_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        found = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        found = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    else:
        found = (0, 1)
    return (found[0] if rank is None else rank, found[1] if world_size is None else world_size)


class StreamingDataset(_Base):  # type: ignore[misc, valid-type]
    """Batches of a dataset served by Conveyor loaders, in a deterministic order, each sample of
    an epoch exactly once (for this rank), through loader failures.

    Iterating yields one dict per batch: one array per field, shape ``[batch, *sample_shape]``,
    plus ``"__index__"``, the int64 global sample indices. With ``output="numpy"`` the arrays
    borrow the received message (no copy). With ``output="torch"`` they are tensors (no copy on
    the CPU; uint16 and uint32 widen to int32 and int64, uint64 is refused); ``device="cuda"``
    copies them through page-locked memory, asynchronously. A ragged field (samples of different
    lengths) is a :class:`Ragged` with numpy output and a jagged nested tensor
    (``torch.nested.nested_tensor_from_jagged``) with torch output.

    It is a ``torch.utils.data.IterableDataset`` when torch is importable. DataLoader workers are
    not needed (the data workers are the loaders); with ``DataLoader(ds, batch_size=None,
    num_workers=k)`` worker w takes batches w, w+k, ..., and the DataLoader's round-robin gives the
    same sequence as iterating ``ds`` directly (a DataLoader with automatic batching raises
    InvalidSettingsError at its first batch). ``state_dict``/``load_state_dict`` follow
    torchdata's ``StatefulDataLoader`` protocol, with or without workers; in the training
    process, ``state_dict()`` and ``stats()`` raise once DataLoader workers have iterated the
    dataset (use the StatefulDataLoader's ``state_dict()``).

    Arguments:
        loaders: loader addresses, ``"host:port"``; a name that resolves to several addresses is
            one replica per address. ``"unix:PATH"`` is a loader's ``--listen-unix`` socket on this
            host (``"unix:DIR/"``: every socket in the directory): batches then arrive through
            shared memory and the arrays are views of it (``CONVEYOR_SHM=0`` turns that off).
            A ``"host:port"`` loader on this host that has such a socket is found and used the
            same way.
        dataset: the dataset's name on the loaders.
        batch_size: samples per batch.
        shuffle: ``"none"``, ``"full"`` (a permutation of the epoch) or ``"block"`` (chunked
            storage: windows of ``shuffle_window`` chunks shuffled together).
        seed: shuffle seed; with the epoch it fixes the order.
        shuffle_window: chunks shuffled together with ``shuffle="block"``.
        drop_last: drop samples that do not fill a whole batch (and an even share across ranks).
        rank, world_size: this process's data-parallel split; default: torch.distributed when
            initialised, else the RANK and WORLD_SIZE environment variables, else 0 and 1.
        prefetch: batches requested ahead of the training loop (client memory is about
            ``prefetch + 2`` batches).
        output: ``"numpy"`` (default) or ``"torch"``.
        device: with ``output="torch"``: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
        request_timeout, unavailable_timeout: seconds before a silent loader is dropped, and
            before no reachable loader at all is LoaderUnavailableError (also while the
            constructor waits for the first loader; Ctrl-C interrupts that wait).
        storage_retry_timeout: seconds a batch whose loader's storage fails transiently (an object
            store timing out or answering 5xx, after the loader's own retries) is asked for
            again before the iteration raises BatchError.
        tls_ca: PEM file of the CA that signs the loaders' certificates; turns TLS on (as
            ``"https://host:port"`` loader addresses do, which otherwise trust the system's roots).
        tls_cert, tls_key: PEM client certificate and key, for loaders that require mutual TLS.
        tls_domain: the name in the loaders' certificates, when it is not the host in ``loaders``.
        auth_token, auth_token_file: the token for loaders started with ``--auth-token-file``
            (the file's first line); default: the ``CONVEYOR_AUTH_TOKEN`` environment variable.
            Every loader refusing it raises AuthenticationError.
    """

    def __init__(
        self,
        loaders: Sequence[str],
        dataset: str,
        batch_size: int = 256,
        shuffle: str = "full",
        seed: int = 0,
        shuffle_window: int = 8,
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        prefetch: int = 8,
        output: str = "numpy",
        device: Optional[str] = None,
        request_timeout: float = 30.0,
        unavailable_timeout: float = 60.0,
        storage_retry_timeout: float = 120.0,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_domain: Optional[str] = None,
        auth_token: Optional[str] = None,
        auth_token_file: Optional[str] = None,
    ) -> None:
        _check_loaders(loaders)
        if shuffle not in _SHUFFLES:
            raise InvalidSettingsError(f"shuffle={shuffle!r}: use one of {', '.join(_SHUFFLES)}")
        if output not in _OUTPUTS:
            raise InvalidSettingsError(f"output={output!r}: use 'numpy' or 'torch'")
        if output == "torch" and torch is None:
            raise InvalidSettingsError("output='torch' needs PyTorch: pip install torch (or use output='numpy')")
        if device is not None and output != "torch":
            raise InvalidSettingsError(f"device={device!r} needs output='torch'")
        self._device = None
        if device is not None:
            try:
                self._device = torch.device(device)
            except RuntimeError as error:
                raise InvalidSettingsError(f"device={device!r}: {error}") from None
        for name, value in (("batch_size", batch_size), ("prefetch", prefetch), ("shuffle_window", shuffle_window)):
            if not isinstance(value, int) or value < 1:
                raise InvalidSettingsError(f"{name}={value!r}: must be an integer >= 1")
        rank, world_size = _default_rank_and_world(rank, world_size)
        self.loaders = list(loaders)
        self.dataset = dataset
        self.output = output
        self._options = dict(
            prefetch=prefetch,
            request_timeout=float(request_timeout),
            unavailable_timeout=float(unavailable_timeout),
            storage_retry_timeout=float(storage_retry_timeout),
            security=_security(
                dict(
                    tls_ca=tls_ca,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                    tls_domain=tls_domain,
                    auth_token=auth_token,
                    auth_token_file=auth_token_file,
                )
            ),
        )
        client = self._client()
        self._plan = client.plan(dataset, batch_size, shuffle, seed, shuffle_window, rank, world_size, drop_last)
        described = next(d for d in json.loads(client.catalog()) if d["name"] == dataset)
        self.info = _info(described)
        self._text_fields = frozenset(f["name"] for f in described["fields"] if f.get("utf8"))
        reserved = [name for name in self.info.fields if name.startswith("__")]
        if reserved:
            raise BatchError(
                f"dataset {dataset!r} has field(s) {reserved} whose names start with __, which would collide with "
                f"the batch's {INDEX_KEY!r}; the loader is older than this package: upgrade it (it refuses such names)"
            )
        self._epoch = 0
        self._resume: Optional[Dict[str, Any]] = None
        self._state: Optional[Dict[str, Any]] = None
        # Iterations by DataLoader workers, counted in memory shared with the forked workers: a
        # count above what this process has seen means its own position is stale.
        self.__dict__["_worker_runs"] = mmap.mmap(-1, 8)
        self._seen_worker_runs = 0

    # Connections are made per process: a forked child (a DataLoader worker) makes its own.
    def _client(self) -> "_native.Client":
        client = self.__dict__.get("_native_client")
        if client is None or self.__dict__.get("_native_pid") != os.getpid():
            client = _connect(self.loaders, **self._options)
            self.__dict__["_native_client"] = client
            self.__dict__["_native_pid"] = os.getpid()
        return client

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_native_client", None)
        state.pop("_native_pid", None)
        # A pickled copy (a spawned DataLoader worker) iterates where this object cannot see it.
        state.pop("_worker_runs", None)
        if torch is None or torch.utils.data.get_worker_info() is None:
            self.__dict__["_sent_away"] = True
        return state

    def _count_worker_run(self) -> None:
        shared = self.__dict__.get("_worker_runs")
        if shared is not None:
            (runs,) = struct.unpack_from("<Q", shared)
            struct.pack_into("<Q", shared, 0, runs + 1)

    def _iterated_elsewhere(self) -> bool:
        """True in the process that made this dataset once DataLoader workers have iterated it."""
        if torch is not None and torch.utils.data.get_worker_info() is not None:
            return False
        if self.__dict__.get("_sent_away"):
            return True
        shared = self.__dict__.get("_worker_runs")
        return shared is not None and struct.unpack_from("<Q", shared)[0] > self._seen_worker_runs

    def _caught_up(self) -> None:
        """This process sets the position again (iterating, set_epoch, load_state_dict)."""
        shared = self.__dict__.get("_worker_runs")
        self._seen_worker_runs = struct.unpack_from("<Q", shared)[0] if shared is not None else 0
        self.__dict__["_sent_away"] = False

    def __len__(self) -> int:
        """Batches per epoch for this rank (of the epoch resumed into, after a resume at another
        world size)."""
        return _native.Client.batches_per_epoch(self._plan, self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration stream epoch ``epoch`` (like DistributedSampler.set_epoch).
        Without it, each iteration after a finished epoch streams the next one.

        After ``load_state_dict``, ``set_epoch`` of the state's epoch keeps the resume point (so
        a loop that calls ``set_epoch(epoch)`` before every epoch resumes mid-epoch); another
        epoch drops it, with a warning, and streams that epoch from its first batch."""
        epoch = int(epoch)
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                return
            warnings.warn(
                f"set_epoch({epoch}) after load_state_dict at epoch {self._resume['epoch']} batch "
                f"{self._resume['next_batch']}: the resume point is dropped and epoch {epoch} streams from its "
                f"first batch",
                stacklevel=2,
            )
        self._epoch = epoch
        self._resume = None
        self._state = {"epoch": epoch, "next_batch": 0}
        self._caught_up()

    def state_dict(self) -> Dict[str, Any]:
        """Where the stream is (JSON-serialisable): the next iteration after ``load_state_dict``
        starts with the batch after the last one this dataset yielded (inside a DataLoader
        worker: that worker's next batch, which torchdata's StatefulDataLoader keeps per worker).

        Raises InvalidSettingsError in the training process once DataLoader workers have
        iterated this dataset: only the DataLoader knows which of their batches it has handed
        out. Take the state from ``torchdata.stateful_dataloader.StatefulDataLoader(ds,
        batch_size=None, num_workers=k).state_dict()``, or iterate with ``num_workers=0``."""
        if self._iterated_elsewhere():
            raise InvalidSettingsError(
                "state_dict() of a StreamingDataset that DataLoader workers iterated: this process cannot know "
                "which of the workers' batches the DataLoader has yielded, so a resume from it would repeat or "
                "skip samples. Use torchdata's StatefulDataLoader(ds, batch_size=None, num_workers=k) and save "
                "its state_dict(), or use num_workers=0 (the data workers are the loaders)"
            )
        cursor = self._state or {"epoch": self._epoch, "next_batch": 0}
        return {"version": 1, "dataset": self.dataset, "plan": json.loads(self._plan),
                "epoch": cursor["epoch"], "next_batch": cursor["next_batch"]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resumes at a ``state_dict()``: the same dataset and plan settings are required, except
        rank and world size. A state saved by one rank resumes every rank of the same world size
        (ranks step together); one saved at another world size resumes the rest of its epoch split
        among this run's ranks (each getting the same number of batches), then whole epochs."""
        try:
            version, dataset, plan = state["version"], state["dataset"], state["plan"]
            epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidSettingsError(f"not a StreamingDataset state_dict: missing or bad {error}") from None
        if version != 1:
            raise InvalidSettingsError(f"state_dict version {version!r} is not supported (expected 1)")
        if not 0 <= epoch <= _MAX_EPOCH or not 0 <= next_batch < 2**63:
            raise InvalidSettingsError(
                f"state_dict names epoch {epoch} batch {next_batch}, which no run reaches (epochs 0..{_MAX_EPOCH}, "
                f"batches from 0): it was edited or damaged"
            )
        if dataset != self.dataset:
            raise InvalidSettingsError(f"state_dict is for dataset {dataset!r}, this dataset streams {self.dataset!r}")
        mine = json.loads(self._plan)
        # Rank and world size may differ: the rest of the epoch is split among this run's ranks.
        for key in sorted((set(mine) | set(plan)) - {"rank", "world_size", "reshard"}):
            if mine.get(key) != plan.get(key):
                raise InvalidSettingsError(
                    f"state_dict was taken with {key}={plan.get(key)!r} but this dataset has {key}={mine.get(key)!r}"
                )
        if any(plan.get(key) != mine.get(key) for key in ("rank", "world_size", "reshard")):
            try:
                self._plan = _native.Client.reshard(json.dumps(plan), epoch, next_batch, mine["rank"],
                                                    mine["world_size"])
            except (KeyError, TypeError, ValueError) as error:
                raise InvalidSettingsError(f"not a StreamingDataset state_dict: bad plan ({error})") from None
            if plan.get("world_size") != mine["world_size"]:
                next_batch = 0  # the rest of the epoch, split among this run's ranks from its start
        self._epoch = epoch
        self._resume = {"epoch": epoch, "next_batch": next_batch}
        self._state = dict(self._resume)
        self._caught_up()

    def stats(self) -> Dict[str, Any]:
        """Counters of the current or last iteration: samples, batches, bytes delivered (also per
        second), seconds waited for data, batches retried after a loader failed, epoch boundaries,
        per replica (batches, bytes, failures).

        Raises InvalidSettingsError in the training process once DataLoader workers have
        iterated this dataset: each worker counts its own batches in its own process."""
        if self._iterated_elsewhere():
            raise InvalidSettingsError(
                "stats() of a StreamingDataset that DataLoader workers iterated: the counters are in the worker "
                "processes, not in this one. Use num_workers=0 (the data workers are the loaders), where stats() "
                "covers the whole run, or call ds.stats() inside each worker"
            )
        stats = json.loads(self._client().stats())
        started, ended = self.__dict__.get("_started"), self.__dict__.get("_ended")
        seconds = ((ended or time.monotonic()) - started) if started is not None else 0.0
        stats["seconds"] = seconds
        stats["samples_per_s"] = stats["samples"] / seconds if seconds > 0 else 0.0
        stats["bytes_per_s"] = stats["delivered_bytes"] / seconds if seconds > 0 else 0.0
        return stats

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, num_workers = 0, 1
        if torch is not None:
            self._refuse_rebatching(sys._getframe(1))
            info = torch.utils.data.get_worker_info()
            if info is not None:
                worker, num_workers = info.id, info.num_workers
                self._count_worker_run()
            else:
                self._caught_up()
        start = self._resume or {"epoch": self._epoch, "next_batch": 0}
        self._resume = None
        epoch = start["epoch"]
        # Worker w streams batches w, w + k, ...: a state it saved names its own next batch.
        start_batch = start["next_batch"] - worker if start["next_batch"] >= worker else 0
        client = self._client()
        client.start(self.dataset, self._plan, epoch, epoch + 1, start_batch, worker, num_workers)
        self.__dict__["_started"], self.__dict__["_ended"] = time.monotonic(), None
        finished = False
        try:
            while True:
                batch = client.next()
                if batch is None:
                    finished = True
                    break
                _, index, indices, fields = batch
                self._state = {"epoch": epoch, "next_batch": index + num_workers}
                yield self._convert(indices, fields)
        finally:
            self.__dict__["_ended"] = time.monotonic()
            client.stop()
            if finished:
                # The next iteration streams the next epoch unless set_epoch says otherwise.
                self._epoch = epoch + 1
                self._state = {"epoch": epoch + 1, "next_batch": 0}

    def _refuse_rebatching(self, caller: Any) -> None:
        """Raises when a DataLoader with automatic batching (``batch_size`` not None) iterates
        this dataset: it would stack N of Conveyor's batches into one (``[1, 256, ...]`` by default)
        and change ``len``. ``caller`` is the frame asking for the first batch."""
        if caller is None or caller.f_code.co_name != "fetch":
            return
        fetcher = caller.f_locals.get("self")
        if getattr(fetcher, "dataset", None) is self and getattr(fetcher, "auto_collation", False) is True:
            raise InvalidSettingsError(
                "a DataLoader with automatic batching would stack several of Conveyor's batches into one "
                "(a leading dimension of its batch_size, default 1, in front of every field): create it with "
                "DataLoader(ds, batch_size=None, ...); Conveyor's batch size is StreamingDataset(batch_size=...)"
            )

    def _convert(self, indices: np.ndarray, fields: List[Tuple[str, np.ndarray, str, List[int], Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name, data, code, shape, offsets in fields:
            array = data.view(_numpy_dtype(code)).reshape(shape)
            if offsets is None:
                out[name] = array if self.output == "numpy" else self._tensor(name, array)
            elif self.output == "numpy":
                out[name] = Ragged(array, offsets, name in self._text_fields)
            else:
                # torch's jagged layout is the wire's: the values and offsets as they are.
                values = self._tensor(name, array)
                out[name] = torch.nested.nested_tensor_from_jagged(values, torch.from_numpy(offsets).to(values.device))
        index = indices.view(np.int64)
        out[INDEX_KEY] = index if self.output == "numpy" else torch.from_numpy(index)
        return out

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        if array.dtype == np.uint16:
            array = array.astype(np.int32)
        elif array.dtype == np.uint32:
            array = array.astype(np.int64)
        elif array.dtype == np.uint64:
            raise BatchError(f"field {name!r} is uint64, which torch cannot hold exactly; store it as int64")
        tensor = torch.from_numpy(array)
        if self._device is None or self._device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self._device, non_blocking=True)

    def __repr__(self) -> str:
        return f"StreamingDataset(dataset={self.dataset!r}, loaders={self.loaders!r}, batches_per_epoch={len(self)})"
