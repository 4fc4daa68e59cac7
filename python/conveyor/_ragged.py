"""conveyor.Ragged's behaviour, in a module that imports nothing at load time: the loader's
Python transform workers run this file's source too (the loader embeds it), so that a transform
function receives the same ``Ragged`` whether or not the ``conveyor`` package is installed
beside it."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple


def _np():
    """numpy, imported on first use."""
    import numpy

    return numpy


class Ragged:
    """One batch of a ragged field: samples of different lengths, as numpy arrays.

    ``values`` holds every sample's rows one after another (``[total rows, *row shape]``) and
    ``offsets`` (int64, one per sample plus one, from 0) where each starts: sample ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``, the layout of Arrow lists and of torch's jagged
    nested tensors. Nothing is padded or copied per sample; ``pad`` makes a dense array when
    one is wanted (JAX, a fixed-shape model input).
    """

    __slots__ = ("values", "offsets", "utf8")

    def __init__(self, values: numpy.ndarray, offsets: numpy.ndarray, utf8: bool = False) -> None:
        self.values = values
        self.offsets = offsets
        self.utf8 = utf8
        """The samples are UTF-8 text (the loaders say so for text members such as WebDataset's
        ``.txt`` and ``.json``)."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> numpy.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of a batch of {n}")
        i %= n
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> numpy.ndarray:
        """Each sample's length (rows), int64."""
        return _np().diff(self.offsets)

    def tolist(self) -> List[Any]:
        """The samples: ``str`` for a text field, ``bytes`` for another uint8 field of single
        values, arrays otherwise."""
        if self.utf8:
            return [self[i].tobytes().decode("utf-8") for i in range(len(self))]
        if self.values.dtype == _np().uint8 and self.values.ndim == 1:
            return [self[i].tobytes() for i in range(len(self))]
        return [self[i] for i in range(len(self))]

    def pad(self, length: Optional[int] = None, value: Any = 0) -> Tuple[numpy.ndarray, numpy.ndarray]:
        """A dense ``[batch, length, *row shape]`` array (``length`` defaults to the longest
        sample; longer samples are cut) filled with ``value`` past each sample's end, and the
        lengths it holds (int64)."""
        lengths = self.lengths()
        length = int(lengths.max(initial=0)) if length is None else length
        if length < 0:
            raise ValueError(f"pad(length={length}): give a length >= 0")
        out = _np().full((len(self), length) + self.values.shape[1:], value, dtype=self.values.dtype)
        kept = _np().minimum(lengths, length)
        for i, n in enumerate(kept):
            out[i, :n] = self[i][:n]
        return out, kept

    def __repr__(self) -> str:
        return f"Ragged({len(self)} samples, {len(self.values)} rows of {self.values.dtype} {self.values.shape[1:]})"
