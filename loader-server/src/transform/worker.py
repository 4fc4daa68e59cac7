# Conveyor transform worker: runs one user function over batches that the loader places in
# shared memory. Started by the loader (never imported by users) as
#   python -c <python/conveyor/_ragged.py + this file> MODULE FUNCTION MEMORY_CAP_BYTES
# (the `Ragged` class that ragged fields arrive as comes from _ragged.py, run just before).
# with fd 0 = the shared memory region (a memfd) and fd 1 = the control socket. Messages on the
# socket are a 4-byte little-endian length and a JSON object. See transform/python.rs.
import importlib
import json
import mmap
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback


def main():
    module_name, function_name, memory_cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Take the region and the socket off fds 0 and 1, so that user code printing to stdout
    # cannot corrupt the protocol: its output goes to the loader's stderr.
    shm_fd, control_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    control = socket.socket(fileno=control_fd)

    def send(message):
        body = json.dumps(message).encode()
        control.sendall(struct.pack("<I", len(body)) + body)

    def receive():
        """The next message; None when the loader is gone (its end closed, or reset because it
        exited with a reply unread: both end the worker and what its function started)."""
        try:
            return read_message()
        except OSError:
            return None

    def read_message():
        header = read_exactly(control, 4)
        if header is None:
            return None
        (length,) = struct.unpack("<I", header)
        body = read_exactly(control, length)
        return None if body is None else json.loads(body)

    try:
        import numpy as np

        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
        if not callable(function):
            raise TypeError(f"{module_name}.{function_name} is a {type(function).__name__}, not a function")
    except BaseException as error:  # noqa: BLE001 - reported to the loader, which refuses to start
        send({"status": "import_failed", "message": f"{type(error).__name__}: {error}"})
        return

    size = os.fstat(shm_fd).st_size
    region = mmap.mmap(shm_fd, size)
    address_space = vm_size()
    if memory_cap:
        if address_space >= memory_cap:
            send({
                "status": "import_failed",
                "message": f"the worker takes {address_space} bytes of address space before its first batch "
                           f"(Python, numpy, {module_name} and the {size}-byte shared region), which is over "
                           f"--transform-worker-memory {memory_cap}",
            })
            return
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))
    send({"status": "ready", "address_space": address_space})

    while True:
        message = receive()
        if message is None or message.get("op") == "exit":
            end_group()
            return
        # Every reply names the request it answers, so the loader can tell a stray write apart.
        request = message["id"]
        num_samples = message["num_samples"]
        batch = {}
        for field in message["fields"]:
            ragged = "offsets" in field
            shape = [field["rows"] if ragged else num_samples] + field["shape"]
            count = 1
            for n in shape:
                count *= n
            values = np.frombuffer(region, dtype=np.dtype(field["dtype"]), count=count,
                                   offset=field["offset"]).reshape(shape)
            if ragged:
                offsets = np.frombuffer(region, dtype="<i8", count=num_samples + 1, offset=field["offsets"])
                values = Ragged(values, offsets, field["utf8"])
            batch[field["name"]] = values
        indices = np.frombuffer(region, dtype="<u8", count=num_samples, offset=message["indices_offset"])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(message["entropy"])))
        started = time.perf_counter()
        try:
            output = function(batch, indices, rng)
        except MemoryError:
            del batch, indices
            send({"status": "memory", "id": request, "message": f"MemoryError: the function allocated past "
                                                 f"--transform-worker-memory {memory_cap}"})
            return
        except BaseException as error:  # noqa: BLE001 - the user's exception goes back to the loader
            lines = traceback.format_exception(type(error), error, error.__traceback__)
            send({"status": "error", "id": request, "message": f"{type(error).__name__}: {error}",
                  "traceback": "".join(lines[-6:])})
            del batch, indices
            continue
        seconds = time.perf_counter() - started
        del batch, indices
        try:
            fields = write_output(np, region, output, num_samples, message["out_offset"], message["out_capacity"])
        except MemoryError:
            send({"status": "memory", "id": request, "message": "MemoryError while copying the output"})
            return
        except OutputError as error:
            send({"status": "schema", "id": request, "message": str(error)})
            continue
        send({"status": "ok", "id": request, "fields": fields, "seconds": seconds})


def end_group():
    """Kills the worker's process group, itself included: whatever the user's function started
    (the loader makes each worker a group leader) ends with the worker, also when the loader is
    gone. Never when this process leads no group of its own."""
    if os.getpgid(0) == os.getpid():
        sys.stdout.flush()
        sys.stderr.flush()
        os.killpg(0, signal.SIGKILL)


class OutputError(Exception):
    pass


DTYPES = {"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"}


def as_ragged(np, name, value, num_samples):
    """(values, offsets, utf8) for a ragged output: a Ragged (anything with `values` and
    `offsets`), or a list of str, of bytes or of arrays (1-D or more), one per sample; None for a
    fixed-shape one."""
    if hasattr(value, "values") and hasattr(value, "offsets") and not isinstance(value, (np.ndarray, dict)):
        values, offsets, utf8 = np.asarray(value.values), np.asarray(value.offsets), bool(getattr(value, "utf8", False))
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        encoded = [v.encode("utf-8") for v in value]
        values, offsets, utf8 = np.frombuffer(b"".join(encoded), dtype=np.uint8), lengths_to_offsets(np, encoded), True
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (bytes, bytearray)) for v in value):
        values, offsets, utf8 = np.frombuffer(b"".join(value), dtype=np.uint8), lengths_to_offsets(np, value), False
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) and v.ndim for v in value):
        kinds = {(v.dtype.str, v.shape[1:]) for v in value}
        if len(kinds) > 1:
            raise OutputError(f"output field '{name}' is a list of arrays of different dtypes or row shapes "
                              f"({sorted(map(str, kinds))}); a ragged field's samples share both")
        values, offsets, utf8 = np.concatenate(value), lengths_to_offsets(np, value), False
    else:
        return None
    if values.ndim == 0:
        raise OutputError(f"ragged output field '{name}' has 0-dimensional values; give them one row per element")
    if offsets.dtype.kind not in "iu" or offsets.shape != (num_samples + 1,):
        raise OutputError(f"ragged output field '{name}' has offsets of dtype {offsets.dtype} and shape "
                          f"{list(offsets.shape)}; it needs {num_samples + 1} integers, one per input sample plus one")
    return values, offsets.astype("<i8"), utf8


def lengths_to_offsets(np, items):
    return np.concatenate([[0], np.cumsum([len(item) for item in items])])


def write_output(np, region, output, num_samples, offset, capacity):
    if not isinstance(output, dict) or not output:
        raise OutputError(f"the function returned {type(output).__name__}; return a non-empty dict of numpy arrays "
                          "(or Ragged, or lists of str or bytes), one row per input sample")
    fields = []
    end = offset + capacity

    def place(name, array, little):
        nonlocal offset
        offset = (offset + 63) // 64 * 64
        if offset + array.nbytes > end:
            raise OutputError(f"output field '{name}' does not fit: the outputs take more than the {capacity} bytes "
                              "left for them; raise --transform-shm-bytes on the loader")
        at = offset
        target = np.frombuffer(region, dtype=little, count=array.size, offset=at).reshape(array.shape)
        np.copyto(target, array, casting="equiv")
        offset += array.nbytes
        return at

    for name, value in output.items():
        if not isinstance(name, str):
            raise OutputError(f"output key {name!r} is not a string")
        ragged = as_ragged(np, name, value, num_samples)
        array = ragged[0] if ragged else np.asarray(value)
        if not ragged and (array.ndim == 0 or array.shape[0] != num_samples):
            raise OutputError(f"output field '{name}' has shape {list(array.shape)}; it needs {num_samples} rows, "
                              "one per input sample")
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if little.str not in DTYPES:
            raise OutputError(f"output field '{name}' has dtype {array.dtype}, which Conveyor cannot serve; "
                              "use bool, (u)int8..64 or float16/32/64")
        field = {"name": name, "dtype": little.str[1:], "shape": list(array.shape[1:]),
                 "offset": place(name, array, little), "nbytes": array.nbytes}
        if ragged:
            field.update(offsets=place(name, ragged[1], np.dtype("<i8")), rows=array.shape[0], utf8=ragged[2])
        fields.append(field)
    return fields


def read_exactly(sock, n):
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def vm_size():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


main()
