"""``conveyor-convert``: HDF5 files and compressed ``.npz`` archives into datasets a loader serves
(a Zarr v3 group or a directory of ``.npy`` shards), slab by slab in bounded memory.

The output is written into ``DST.partial`` beside ``DST`` with a journal of the rows already
written, and renamed to ``DST`` only after every field is written and (unless ``--no-verify``)
read back and compared with the source bit for bit. An interrupted run (Ctrl-C, OOM kill, power
loss) resumes where the journal says when started again with the same arguments.

HDF5 support is whatever h5py reads: contiguous and chunked datasets, gzip, lzf, szip and the
shuffle/fletcher32 filters (and the filters of ``hdf5plugin`` when it is installed). Datasets of
bool, (u)int8-64 and float16/32/64, either byte order, are converted; other datasets (strings,
compound, references) and 0-d datasets are skipped with a message, or refused when named in
``--fields``. Dimension scales (netCDF4 coordinates) are skipped unless named.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

JOURNAL = ".conveyor-convert.json"
SUPPORTED_KINDS = "biuf"  # bool, signed, unsigned, float
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConvertError(Exception):
    """A conversion that cannot go on; the message names the file, field or flag and the fix."""


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte size; write for example 256MiB or 1GiB")
    return int(match.group(1)) * UNITS[match.group(2)]


def little_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def supported(dtype: np.dtype) -> bool:
    return dtype.kind in SUPPORTED_KINDS and dtype.fields is None and dtype.subdtype is None


def field_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be an output field (it becomes a file or array name under DST, and the
    loader applies the same rule), or None."""
    if not name:
        return "it is empty"
    if len(name.encode()) > 200:
        return "it is longer than 200 bytes"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    if name in (".", ".."):
        return "it names a directory"
    if name.startswith("__"):
        return "names starting with __ are kept for Conveyor's own"
    return None


def check_names(path: str, names: Dict[str, str]) -> None:
    """Refuses output names that are not plain file names, and sources whose different names
    would become one field (`/a/b` and `/a.b` are both `a.b`); `names` maps each source name
    to its output name."""
    by_output: Dict[str, List[str]] = {}
    for source_name, name in names.items():
        problem = field_name_problem(name)
        if problem:
            raise ConvertError(f"{path}: {source_name} would become field {name!r}, which cannot be written: {problem}; "
                               "rename it in the source, or leave it out with --fields")
        by_output.setdefault(name, []).append(source_name)
    for name, sources in by_output.items():
        if len(sources) > 1:
            raise ConvertError(f"{path}: {' and '.join(sorted(sources))} would both become field {name!r}; rename one in the "
                               "source, or choose one with --fields")


class Field:
    """One array to convert: its name in the output, dtype and full shape."""

    def __init__(self, name: str, dtype: np.dtype, shape: Tuple[int, ...]):
        self.name, self.dtype, self.shape = name, little_endian(dtype), tuple(int(d) for d in shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


class Hdf5Source:
    """Datasets of an HDF5 file, read as row ranges (h5py reads only the chunks they touch)."""

    def __init__(self, path: str, select: Optional[List[str]], allow_sparse: bool = False, memory: int = 1 << 62):
        import h5py
        try:
            import hdf5plugin  # noqa: F401  (registers more filters when installed)
        except ImportError:
            pass
        self.path = path
        found: Dict[str, "h5py.Dataset"] = {}

        def visit(key: str, obj: object) -> None:  # returning a value would stop the walk
            if isinstance(obj, h5py.Dataset):
                found[key] = obj
        try:
            self.file = h5py.File(path, "r")
            self.file.visititems(visit)
        except (OSError, KeyError, RuntimeError, ValueError) as error:
            raise ConvertError(f"{path}: not a readable HDF5 file (truncated or damaged?): {error}") from error
        check_names(path, {f"dataset '/{key}'": key.replace("/", ".") for key in found})
        self.datasets: Dict[str, "h5py.Dataset"] = {}
        self.fields: Dict[str, Field] = {}
        self.skipped: List[str] = []
        for key in sorted(found):
            dataset, name = found[key], key.replace("/", ".")
            reason = None
            if not supported(dataset.dtype):
                reason = f"its dtype {dataset.dtype} is not bool, (u)int8-64 or float16/32/64"
            elif dataset.ndim == 0:
                reason = "it is 0-dimensional (axis 0 must index samples)"
            elif select is None and h5py.h5ds.is_scale(dataset.id):
                reason = "it is a dimension scale (a coordinate); name it in --fields to convert it"
            if select is not None and name not in select:
                continue
            if not reason:
                reason = self._storage_problem(dataset, allow_sparse, memory)
            if reason:
                if select is not None:
                    raise ConvertError(f"{path}: dataset '/{key}' (--fields {name}) cannot be converted: {reason}")
                self.skipped.append(f"/{key} {dataset.dtype}{list(dataset.shape)}: {reason}")
                continue
            self.datasets[name] = dataset
            self.fields[name] = Field(name, dataset.dtype, dataset.shape)
        check_selection(path, select, sorted(k.replace("/", ".") for k in found))

    @staticmethod
    def _storage_problem(dataset, allow_sparse: bool, memory: int) -> Optional[str]:
        """Why the bytes of `dataset` cannot be converted safely, or None: data kept outside the
        file, chunks that decompress past the memory budget, or far more rows declared than stored."""
        if dataset.external:
            files = ", ".join(str(e[0]) for e in dataset.external)
            return (f"it keeps its data in external files ({files}); conveyor-convert reads only what is inside the "
                    "source file (copy the data in with h5repack, or leave the dataset out with --fields)")
        if dataset.is_virtual:
            return ("it is a virtual dataset mapping other files; conveyor-convert reads only what is inside the source "
                    "file (materialise it with h5repack, or leave it out with --fields)")
        if dataset.chunks:
            chunk_bytes = int(np.prod(dataset.chunks, dtype=np.int64)) * dataset.dtype.itemsize
            if chunk_bytes > memory // 2:
                return (f"it is stored in chunks of {chunk_bytes} bytes, which h5py decompresses whole: over half of "
                        f"--memory {memory}; raise --memory above {2 * chunk_bytes} or rechunk it with h5repack")
        logical = int(np.prod(dataset.shape, dtype=np.float64)) * dataset.dtype.itemsize
        stored = dataset.id.get_storage_size()
        if not allow_sparse and logical > (1 << 30) and logical > 10_000 * max(stored, 1):
            return (f"it declares {dataset.shape[0]} rows ({logical} bytes) but stores only {stored} bytes: the rest is "
                    "unwritten fill value; pass --allow-sparse to convert it anyway, or convert a slice")
        return None

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            rows = self.datasets[name][start:stop]
        except (OSError, ValueError) as error:
            raise ConvertError(
                f"{self.path}: cannot read rows {start}..{stop} of dataset '{self.datasets[name].name}': {error} "
                "(a filter h5py lacks? install hdf5plugin)") from error
        return np.ascontiguousarray(rows, dtype=self.fields[name].dtype)

    def close(self) -> None:
        self.file.close()


class NpzSource:
    """Members of an ``.npz`` archive (compressed or not), streamed row range by row range: a
    deflated member is inflated sequentially, never whole."""

    def __init__(self, path: str, select: Optional[List[str]]):
        self.path = path
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise ConvertError(f"{path}: not a readable .npz (zip) archive: {error}") from error
        self.fields: Dict[str, Field] = {}
        self.skipped: List[str] = []
        self.members: Dict[str, str] = {}
        self.source_dtypes: Dict[str, np.dtype] = {}
        self.streams: Dict[str, Tuple[object, int]] = {}  # name -> (open member, next row)
        names = []
        members = [info for info in self.archive.infolist() if info.filename.endswith(".npy")]
        check_names(path, {f"member {info.filename!r}": info.filename[:-4] for info in members})
        for info in members:
            name = info.filename[:-4]
            names.append(name)
            if select is not None and name not in select:
                continue
            try:
                with self.archive.open(info) as member:
                    dtype, shape, fortran = self._header(member, info.filename)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as error:
                raise ConvertError(f"{path}: member {info.filename} cannot be read (truncated or damaged?): {error}") \
                    from error
            reason = None
            if not supported(dtype):
                reason = f"its dtype {dtype} is not bool, (u)int8-64 or float16/32/64"
            elif len(shape) == 0:
                reason = "it is 0-dimensional (axis 0 must index samples)"
            elif fortran and len(shape) > 1:
                reason = "it is Fortran-ordered, so its rows are not contiguous; save np.ascontiguousarray(x) instead"
            if reason:
                if select is not None:
                    raise ConvertError(f"{path}: member {info.filename} cannot be converted: {reason}")
                self.skipped.append(f"{info.filename}: {reason}")
                continue
            self.members[name] = info.filename
            self.source_dtypes[name] = dtype
            self.fields[name] = Field(name, dtype, shape)
        check_selection(path, select, sorted(names))

    def _header(self, member, filename: str) -> Tuple[np.dtype, Tuple[int, ...], bool]:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(member)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(member)
        except ValueError as error:
            raise ConvertError(f"{self.path}: member {filename} is not a readable .npy file: {error}") from error
        return dtype, shape, fortran

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        member, position = self.streams.get(name, (None, None))
        if member is None or position > start:
            if member is not None:
                member.close()
            member = self.archive.open(self.members[name])
            self._header(member, self.members[name])  # positions the stream at row 0
            position = 0
        field = self.fields[name]
        # Skip to `start` in bounded steps (a resumed run inflates what it skips, keeping nothing).
        while position < start:
            step = min(start - position, max(1, (16 << 20) // max(1, field.row_bytes)))
            member.read(step * field.row_bytes)
            position += step
        want = (stop - start) * field.row_bytes
        try:
            data = member.read(want)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
            raise ConvertError(f"{self.path}: member {self.members[name]} cannot be read at row {start} (truncated or "
                               f"damaged?): {error}") from error
        if len(data) != want:
            raise ConvertError(f"{self.path}: member {self.members[name]} ends before row {stop}; the archive is truncated")
        self.streams[name] = (member, stop)
        rows = np.frombuffer(data, dtype=self.source_dtypes[name]).reshape((stop - start,) + field.shape[1:])
        return np.ascontiguousarray(rows, dtype=field.dtype)

    def close(self) -> None:
        for member, _ in self.streams.values():
            member.close()
        self.archive.close()


def check_selection(path: str, select: Optional[List[str]], names: List[str]) -> None:
    for name in select or []:
        if name not in names:
            raise ConvertError(f"{path}: --fields names '{name}', which it does not have; it has: {', '.join(names)}")


def open_source(path: str, select: Optional[List[str]], allow_sparse: bool = False, memory: int = 1 << 62):
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        return NpzSource(path, select)
    import h5py
    if h5py.is_hdf5(path):
        return Hdf5Source(path, select, allow_sparse, memory)
    raise ConvertError(f"{path}: neither an HDF5 file nor an .npz archive; conveyor-convert reads those two")


class ZarrSink:
    """A Zarr v3 group: one array per field, zstd, chunked (and optionally sharded) along axis 0."""

    def __init__(self, path: str, fields: Sequence[Field], args: argparse.Namespace, resume: bool):
        import zarr
        from zarr.codecs import ZstdCodec
        # zarr-python encodes on a thread pool as wide as the machine; every thread can keep a
        # malloc arena of chunk-sized buffers, which would break the --memory bound.
        zarr.config.set({"threading.max_workers": args.threads})
        self.path = path
        group = zarr.open_group(path, mode="a" if resume else "w", zarr_format=3)
        self.arrays = {}
        for field in fields:
            if resume and field.name in group:
                self.arrays[field.name] = group[field.name]
                continue
            rest = field.shape[1:]
            self.arrays[field.name] = group.create_array(
                field.name, shape=field.shape, dtype=field.dtype, chunks=(args.chunk_rows[field.name],) + rest,
                shards=(args.write_rows[field.name],) + rest if args.shard_samples else None,
                compressors=ZstdCodec(level=args.zstd_level), fill_value=0,
                # Every chunk is stored, zeros too: the loader reads an absent chunk as lost data.
                config={"write_empty_chunks": True})

    def resume_point(self, name: str, done: int) -> int:
        """Where a resumed run starts: every write covers whole chunks (or shards)."""
        return done

    def write(self, name: str, start: int, rows: np.ndarray) -> None:
        self.arrays[name][start:start + len(rows)] = rows

    def reader(self, name: str):
        return lambda start, stop: self.arrays[name][start:stop]


class NpySink:
    """A directory of ``FIELD.npy`` files, or ``FIELD-00000.npy`` shards with ``--shard-samples``;
    each file is written beside its final name and renamed when complete."""

    def __init__(self, path: str, fields: Sequence[Field], args: argparse.Namespace, resume: bool):
        if not resume:
            os.makedirs(path, exist_ok=True)
        self.path, self.shard_samples, self.fields = path, args.shard_samples, {f.name: f for f in fields}
        self.open: Dict[str, object] = {}

    def resume_point(self, name: str, done: int) -> int:
        """Where a resumed run starts: files are complete or absent, so at the last whole file."""
        return done // self.shard_samples * self.shard_samples if self.shard_samples else 0

    def _file(self, name: str, shard: Optional[int]) -> str:
        return os.path.join(self.path, f"{name}.npy" if shard is None else f"{name}-{shard:05d}.npy")

    def _shard_of(self, name: str, row: int) -> Tuple[Optional[int], int, int]:
        """The shard holding `row` (None for a single file) and its first and end rows."""
        length = self.fields[name].shape[0]
        if not self.shard_samples:
            return None, 0, length
        shard = row // self.shard_samples
        return shard, shard * self.shard_samples, min(length, (shard + 1) * self.shard_samples)

    def write(self, name: str, start: int, rows: np.ndarray) -> None:
        field = self.fields[name]
        while len(rows):
            shard, first, last = self._shard_of(name, start)
            final = self._file(name, shard)
            if start == first:
                header = {"descr": np.lib.format.dtype_to_descr(field.dtype), "fortran_order": False,
                          "shape": (last - first,) + field.shape[1:]}
                handle = open(final + ".tmp", "wb")
                np.lib.format.write_array_header_2_0(handle, header)
                self.open[name] = handle
            handle = self.open[name]
            here, rows = rows[:last - start], rows[last - start:]
            handle.write(memoryview(np.ascontiguousarray(here)).cast("B"))
            start += len(here)
            if start == last:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(final + ".tmp", final)
                del self.open[name]

    def reader(self, name: str):
        def read(start: int, stop: int) -> np.ndarray:
            parts = []
            while start < stop:
                shard, first, last = self._shard_of(name, start)
                array = np.load(self._file(name, shard), mmap_mode="r")
                parts.append(np.array(array[start - first:min(stop, last) - first]))
                start = min(stop, last)
            return np.concatenate(parts)
        return read

    def close(self) -> None:
        for handle in self.open.values():
            handle.close()


def plan(fields: Dict[str, Field], args: argparse.Namespace) -> None:
    """Rows per chunk and per write (a whole number of chunks, or of shards when sharding), kept
    within the memory budget: a slab is an eighth of --memory, because a write holds several copies
    of it at once (source rows, rows converted to little-endian, zarr's chunk buffers and
    compressed output; source and read-back rows during verification)."""
    args.chunk_rows, args.write_rows = {}, {}
    slab_bytes = max(1, args.memory // 8)
    for field in fields.values():
        row = max(1, field.row_bytes)
        chunk = args.chunk_samples or max(1, min(field.shape[0], min(args.chunk_bytes, slab_bytes) // row))
        unit = args.shard_samples or chunk
        if args.format == "zarr" and args.shard_samples and args.shard_samples % chunk:
            raise ConvertError(f"--shard-samples {args.shard_samples} is not a multiple of the chunk length {chunk} "
                               f"of field '{field.name}'; pick a multiple, or set --chunk-samples")
        if args.format == "zarr" and unit * row > slab_bytes:
            what = "shard" if args.shard_samples else "chunk"
            raise ConvertError(f"one {what} of field '{field.name}' ({unit} rows of {row} bytes) is larger than a "
                               f"eighth of --memory {args.memory}; raise --memory or lower --{what}-samples")
        args.chunk_rows[field.name] = chunk
        per_write = max(1, slab_bytes // row)
        if args.format == "zarr":
            per_write = max(unit, per_write // unit * unit)
        args.write_rows[field.name] = per_write


def slabs(num_rows: int, step: int, start: int = 0) -> Iterator[Tuple[int, int]]:
    for first in range(start, num_rows, step):
        yield first, min(num_rows, first + step)


def identity(path: str) -> Dict[str, object]:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def save_journal(partial: str, journal: Dict[str, object]) -> None:
    tmp = os.path.join(partial, JOURNAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump(journal, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(partial, JOURNAL))


def progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=True if quiet else None, file=sys.stderr)


def convert(args: argparse.Namespace) -> Dict[str, object]:
    dst = args.dst.rstrip("/")
    partial = dst + ".partial"
    if os.path.exists(dst):
        raise ConvertError(f"{dst} already exists; remove it or choose another destination")
    source = open_source(args.src, args.fields, args.allow_sparse, args.memory)
    try:
        fields = source.fields
        for line in source.skipped:
            print(f"conveyor-convert: skipped {line}", file=sys.stderr)
        if not fields:
            raise ConvertError(f"{args.src}: nothing to convert (skipped: {'; '.join(source.skipped) or 'nothing'})")
        lengths = {f.shape[0] for f in fields.values()}
        if len(lengths) > 1:
            listing = ", ".join(f"{f.name} {list(f.shape)}" for f in fields.values())
            raise ConvertError(f"{args.src}: the fields have different lengths along axis 0 ({listing}); every field "
                               "needs one entry per sample, so choose fields that agree with --fields A,B")
        plan(fields, args)
        options = {k: getattr(args, k) for k in ("format", "chunk_samples", "chunk_bytes", "shard_samples",
                                                 "zstd_level", "fields")}
        options["write_rows"] = args.write_rows
        journal = {"source": identity(args.src), "options": options, "done": {}, "verified": False}
        resume = False
        if os.path.exists(partial):
            try:
                with open(os.path.join(partial, JOURNAL)) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = None
            if args.restart:
                shutil.rmtree(partial)
            elif previous and previous.get("verification_failed"):
                raise ConvertError(f"{partial} failed verification before ({previous['verification_failed']}); its output "
                                   "is not the source's, so it is never promoted: pass --restart to convert again")
            elif previous and previous["source"] == journal["source"] and previous["options"] == options:
                journal, resume = previous, True
            else:
                raise ConvertError(f"{partial} holds an unfinished conversion of another source or with other options; "
                                   "pass --restart to discard it, or run with the arguments it was started with")
        os.makedirs(partial, exist_ok=True)
        sink = (ZarrSink if args.format == "zarr" else NpySink)(partial, list(fields.values()), args, resume)
        save_journal(partial, journal)

        total = sum(f.shape[0] * f.row_bytes for f in fields.values())
        done_bytes = sum(journal["done"].get(n, 0) * f.row_bytes for n, f in fields.items())
        started = time.monotonic()
        with progress(total, args.quiet, "convert") as bar:
            bar.update(done_bytes)
            for name, field in fields.items():
                resume_at = sink.resume_point(name, journal["done"].get(name, 0))
                bar.update(resume_at * field.row_bytes - journal["done"].get(name, 0) * field.row_bytes)
                for first, last in slabs(field.shape[0], args.write_rows[name], resume_at):
                    rows = source.read(name, first, last)
                    sink.write(name, first, rows)
                    journal["done"][name] = last
                    save_journal(partial, journal)
                    bar.update(rows.nbytes)
                    del rows
        if isinstance(sink, NpySink):
            sink.close()
        written_seconds = time.monotonic() - started

        mismatches = []
        if args.verify:
            with progress(total, args.quiet, "verify") as bar:
                for name, field in fields.items():
                    read = sink.reader(name)
                    for first, last in slabs(field.shape[0], args.write_rows[name]):
                        want, got = source.read(name, first, last), read(first, last)
                        bits = f"u{field.dtype.itemsize}"
                        if got.dtype != field.dtype or not np.array_equal(want.view(bits), got.view(bits)):
                            mismatches.append(f"{name} rows {first}..{last}")
                            break
                        bar.update(want.nbytes)
            if mismatches:
                journal["verification_failed"] = ", ".join(mismatches)
                save_journal(partial, journal)
                raise ConvertError(f"verification failed: the output differs from the source in {', '.join(mismatches)}; "
                                   f"{partial} is kept for inspection (--restart starts over)")
        os.remove(os.path.join(partial, JOURNAL))
        os.replace(partial, dst)
        return {"fields": {n: [str(f.dtype), list(f.shape)] for n, f in fields.items()}, "bytes": total,
                "write_seconds": round(written_seconds, 3), "verified": bool(args.verify), "resumed": resume,
                "skipped": source.skipped, "destination": dst}
    finally:
        source.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conveyor-convert",
        description="Convert an HDF5 file or an .npz archive (compressed or not) into a Zarr v3 group or a directory "
                    "of .npy shards that a Conveyor loader serves, in bounded memory, resumably, with a verification "
                    "pass. The output appears at DST only when complete and verified.")
    p.add_argument("src", help="HDF5 file (.h5, .hdf5, .nc) or .npz archive")
    p.add_argument("dst", help="output: a Zarr group directory (--format zarr) or a directory of .npy files")
    p.add_argument("--format", choices=["zarr", "npy"], default=None,
                   help="output layout (default: zarr when DST ends in .zarr, else npy)")
    p.add_argument("--fields", type=lambda s: [f.strip() for f in s.split(",") if f.strip()], default=None,
                   help="convert only these datasets/members (comma-separated; HDF5 paths with '/' written as '.')")
    p.add_argument("--chunk-samples", type=int, default=0,
                   help="Zarr chunk length along axis 0 (default: about --chunk-bytes per chunk)")
    p.add_argument("--chunk-bytes", type=parse_bytes, default=parse_bytes("1MiB"),
                   help="target bytes per Zarr chunk when --chunk-samples is not given (default 1MiB)")
    p.add_argument("--shard-samples", type=int, default=0,
                   help="Zarr: samples per shard (sharding codec; a multiple of the chunk length). "
                        "npy: samples per FIELD-NNNNN.npy shard. Default: no sharding, one FIELD.npy")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd level of the Zarr chunks (default 3)")
    p.add_argument("--memory", type=parse_bytes, default=parse_bytes("256MiB"),
                   help="working memory for data in bytes (default 256MiB); peak RSS stays below the interpreter "
                        "with its imports plus this")
    p.add_argument("--threads", type=int, default=2,
                   help="threads compressing Zarr chunks (default 2; each adds buffers outside --memory)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the output back and comparing it with the source")
    p.add_argument("--restart", action="store_true", help="discard an unfinished DST.partial instead of resuming it")
    p.add_argument("--allow-sparse", action="store_true",
                   help="convert HDF5 datasets that declare over 10000 times more bytes (and over 1 GiB) than they "
                        "store; their unwritten chunks become the fill value in full")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def release_large_buffers() -> None:
    """glibc raises its mmap threshold after large buffers are freed, so later slab-sized
    buffers come from the heap and stay resident after use; a fixed 1 MiB threshold makes every
    slab an mmap that is returned when freed (the conversion's memory bound depends on it)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def main(argv: Optional[Sequence[str]] = None) -> int:
    release_large_buffers()
    args = parser().parse_args(argv)
    if args.format is None:
        args.format = "zarr" if args.dst.rstrip("/").endswith(".zarr") else "npy"
    if args.shard_samples < 0 or args.chunk_samples < 0 or args.threads < 1:
        print("conveyor-convert: error: --shard-samples, --chunk-samples and --threads must be positive",
              file=sys.stderr)
        return 2
    try:
        summary = convert(args)
    except ConvertError as error:
        print(f"conveyor-convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("conveyor-convert: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
