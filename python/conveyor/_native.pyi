"""Type stubs of conveyor._native, the Rust part of the package (see conveyor/__init__.py)."""

from typing import List, Optional, Tuple, TypedDict

import numpy as np
import numpy.typing as npt

class ConveyorError(Exception):
    """Base class of every Conveyor error."""

class LoaderUnavailableError(ConveyorError):
    """No loader could be reached (or none stayed reachable for the unavailable timeout)."""

class UnknownDatasetError(ConveyorError):
    """The loaders serve no dataset of that name."""

class InvalidSettingsError(ConveyorError):
    """Settings the loaders cannot serve: a bad address, batch size, rank, window or state."""

class BatchError(ConveyorError):
    """A loader refused a batch or sent a malformed one."""

class AuthenticationError(ConveyorError):
    """Every loader refused the client's credentials: a missing or wrong token or client certificate."""

Field = Tuple[str, npt.NDArray[np.uint8], str, List[int], Optional[npt.NDArray[np.int64]]]

class Security(TypedDict):
    """The TLS and token arguments: every key present, None where not given."""

    tls_ca: Optional[str]
    tls_cert: Optional[str]
    tls_key: Optional[str]
    tls_domain: Optional[str]
    auth_token: Optional[str]
    auth_token_file: Optional[str]

class Client:
    def __init__(
        self,
        loaders: List[str],
        prefetch: int = 8,
        request_timeout: float = 30.0,
        unavailable_timeout: float = 60.0,
        resolve_interval: float = 3.0,
        max_message_bytes: Optional[int] = None,
        security: Optional[Security] = None,
        storage_retry_timeout: float = 120.0,
    ) -> None: ...
    def catalog(self) -> str: ...
    def plan(
        self,
        dataset: str,
        batch_size: int,
        shuffle: str,
        seed: int,
        shuffle_window: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> str: ...
    @staticmethod
    def batches_per_epoch(plan: str, epoch: int = 0) -> int: ...
    @staticmethod
    def reshard(plan: str, epoch: int, next_batch: int, rank: int, world_size: int) -> str: ...
    def start(
        self,
        dataset: str,
        plan: str,
        first_epoch: int,
        end_epoch: int,
        start_batch: int = 0,
        worker: int = 0,
        num_workers: int = 1,
    ) -> None: ...
    def next(self) -> Optional[Tuple[int, int, npt.NDArray[np.uint64], List[Field]]]: ...
    def cursor(self) -> Optional[str]: ...
    def stats(self) -> str: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
    def abandon(self) -> None: ...

def datasets(
    loaders: List[str],
    unavailable_timeout: float = 10.0,
    security: Optional[Security] = None,
) -> str: ...
