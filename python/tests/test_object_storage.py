"""Datasets in S3-compatible object storage: a real S3 API server (moto's standalone server, with
SigV4 authentication enforced) on loopback, fixtures written by numpy, zarr-python and xarray
and uploaded with boto3, and real loader processes reading s3:// URLs."""

import http.client
import http.server
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pytest
import xarray as xr
import zarr

import conveyor
from conftest import binary, free_port, metric, metrics, write_dtypes

pytestmark = pytest.mark.filterwarnings("ignore:The data type", "ignore:Consolidated metadata")


class Moto:
    """moto's S3 server as a process on a free port (or `port`), its request log in `tmp`.
    `env` may set INITIAL_NO_AUTH_ACTION_COUNT, after which every request is authenticated."""

    def __init__(self, tmp, port=0, env=None):
        self.log = open(os.path.join(tmp, f"moto-{port}-{time.monotonic_ns()}.log"), "w")
        # This interpreter's moto (tests/requirements.txt), not whatever moto_server is on PATH.
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stderr=subprocess.PIPE, stdout=self.log, text=True,
                                     env=dict(os.environ, **(env or {})))
        for line in self.proc.stderr:
            match = re.search(r"Running on (http://\S+)", line)
            if match:
                self.endpoint = match.group(1)
                break
        else:
            raise RuntimeError("moto_server did not start")
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        # Keep draining its request log so that it never blocks on a full pipe.
        self.drain = subprocess.Popen(["cat"], stdin=self.proc.stderr, stdout=self.log)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.drain.wait()
        self.log.close()


class S3Server(Moto):
    """moto with SigV4 enforced: IAM credentials made before authentication starts."""

    def __init__(self, tmp):
        # The first three requests (user, key, policy) go unauthenticated; every later one is checked.
        super().__init__(tmp, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="loader")
        key = iam.create_access_key(UserName="loader")["AccessKey"]
        iam.put_user_policy(UserName="loader", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)
        self.client.create_bucket(Bucket="data")

    def env(self, **overrides):
        env = {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": self.endpoint}
        env.update(overrides)
        return env

    def upload_dir(self, local, prefix):
        for root, _, files in os.walk(local):
            for name in files:
                path = os.path.join(root, name)
                key = prefix + "/" + os.path.relpath(path, local).replace(os.sep, "/")
                self.client.upload_file(path, "data", key)

    def stop(self):
        self.kill()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("moto")))
    yield server
    server.stop()


def epoch(loader, name, shuffle, batch_size=16, seed=5):
    ds = conveyor.StreamingDataset([loader.addr], name, batch_size=batch_size, shuffle=shuffle, seed=seed)
    batches = list(ds)
    index = np.concatenate([b["__index__"] for b in batches])
    order = np.argsort(index)
    return index, {k: np.concatenate([b[k] for b in batches])[order] for k in batches[0] if k != "__index__"}


def refusal(env, *args):
    """The loader's start-up error with `env` over the environment (a None value unsets)."""
    env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
    result = subprocess.run([binary("loader-server"), "--listen", "127.0.0.1:0", *map(str, args)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_npy_fields_of_every_dtype_round_trip_through_s3_bit_exactly(tmp_path, s3, start_loader):
    fields = write_dtypes(tmp_path / "d")
    shards = [np.arange(n * 2, dtype="<u2").reshape(n, 2) + i * 100 for i, n in enumerate((20, 0, 33))]
    for i, shard in enumerate(shards):
        np.save(tmp_path / "d" / f"s-{i:05d}.npy", shard)
    s3.upload_dir(tmp_path / "d", "dtypes")
    loader = start_loader({"d": "s3://data/dtypes"}, env=s3.env())
    info = conveyor.datasets([loader.addr])["d"]
    assert info.num_samples == 53 and set(info.fields) == set(fields) | {"s"}
    for shuffle in ("full", "block"):
        index, got = epoch(loader, "d", shuffle, batch_size=7)
        assert sorted(index.tolist()) == list(range(53)), f"{shuffle}: exactly once"
        for name, source in fields.items():
            assert got[name].tobytes() == source.astype(source.dtype.newbyteorder("<")).tobytes(), name
        assert np.array_equal(got["s"], np.concatenate(shards))


def test_variable_length_zarr_arrays_over_s3_arrive_as_written(tmp_path, s3, start_loader):
    from zarr.core.dtype import VariableLengthBytes, VariableLengthUTF8

    rng = np.random.default_rng(4)
    texts = [f"caption {i} " + "ü" * int(rng.integers(0, 30)) for i in range(40)]
    blobs = [rng.integers(0, 256, size=int(rng.integers(0, 500)), dtype=np.uint8).tobytes() for _ in range(40)]
    group = zarr.open_group(tmp_path / "vlen.zarr", mode="w", zarr_format=3)
    group.create_array("text", shape=(40,), chunks=(6,), dtype=VariableLengthUTF8())[:] = np.array(texts, dtype=object)
    group.create_array("blob", shape=(40,), chunks=(6,), dtype=VariableLengthBytes())[:] = np.array(blobs, dtype=object)
    s3.upload_dir(tmp_path / "vlen.zarr", "vlen.zarr")
    loader = start_loader({"v": "s3://data/vlen.zarr"}, env=s3.env())
    ds = conveyor.StreamingDataset([loader.addr], "v", batch_size=7, shuffle="full", seed=1)
    seen = []
    for batch in ds:
        for row, i in enumerate(batch["__index__"].tolist()):
            assert batch["text"].tolist()[row] == texts[i] and batch["blob"].tolist()[row] == blobs[i]
            seen.append(i)
    assert sorted(seen) == list(range(40))


IMAGE_TREE = ["cat/1.png", "cat/2.jpg", "cat/sub/0.png", "cat/sub-b/9.png", "dog/a.webp", "dog/b.png", "dog/z.png"]


def write_image_tree(root):
    """An image folder with nested class directories (files beside a directory come first)."""
    rng = np.random.default_rng(8)
    for name in IMAGE_TREE:
        os.makedirs((root / name).parent, exist_ok=True)
        (root / name).write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 4000)), dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not a class")


def same_folder(local, remote, root):
    """The remote loader serves the local one's samples: same indices, bytes and labels."""
    def served(loader):
        out = {}
        for batch in conveyor.StreamingDataset([loader.addr], "f", batch_size=3, shuffle="full", seed=4):
            for row, i in enumerate(batch["__index__"].tolist()):
                out[i] = (batch["image"].tolist()[row], int(batch["label"][row]))
        return out

    got, expected = served(remote), served(local)
    assert sorted(got) == list(range(len(IMAGE_TREE))) and got == expected
    assert sorted(data for data, _ in got.values()) == sorted((root / f).read_bytes() for f in IMAGE_TREE)
    assert [label for _, label in sorted(got.values(), key=lambda v: v[1])] == [0, 0, 0, 0, 1, 1, 1]


def test_an_image_folder_in_s3_serves_what_the_local_folder_does(tmp_path, s3, start_loader):
    write_image_tree(tmp_path / "folder")
    s3.upload_dir(tmp_path / "folder", "folder")
    same_folder(start_loader({"f": tmp_path / "folder"}),
                start_loader({"f": "s3://data/folder"}, env=s3.env()), tmp_path / "folder")


def test_ragged_npy_pairs_in_s3_serve_what_the_local_pairs_do(tmp_path, s3, start_loader):
    from test_ragged import write_ragged

    tokens, texts = write_ragged(tmp_path / "r")
    np.save(tmp_path / "r" / "wide.npy", np.arange(10, dtype=">f8"))  # big-endian values
    np.save(tmp_path / "r" / "wide.offsets.npy", np.array([0] + [0] * 30 + [4] * 20 + [10] * 11, dtype="<i8"))
    s3.upload_dir(tmp_path / "r", "ragged")
    loader = start_loader({"r": "s3://data/ragged"}, env=s3.env())
    info = conveyor.datasets([loader.addr])["r"]
    assert info.fields["tokens"] == (np.dtype(np.int32), (None, 2)) and info.fields["wide"][1] == (None,)
    bounds = [0] + [0] * 30 + [4] * 20 + [10] * 11
    seen = []
    for batch in conveyor.StreamingDataset([loader.addr], "r", batch_size=8, shuffle="full", seed=2):
        for row, i in enumerate(batch["__index__"].tolist()):
            np.testing.assert_array_equal(batch["tokens"][row], tokens[i])
            assert batch["text"].tolist()[row].decode() == texts[i]
            np.testing.assert_array_equal(batch["wide"][row], np.arange(10.0)[bounds[i]:bounds[i + 1]])
            seen.append(i)
    assert sorted(seen) == list(range(len(tokens)))
    # The text documents packed into windows, read from the store as from a local pair.
    from test_tokens import reference_packing

    packed = start_loader({"p": "s3://data/ragged"}, "--fields", "p=text", "--pack", "p=16,eos=10", env=s3.env())
    expected = reference_packing([np.frombuffer(t.encode(), dtype=np.uint8) for t in texts], 16, 10)
    got = {}
    for batch in conveyor.StreamingDataset([packed.addr], "p", batch_size=9, shuffle="full", seed=2):
        for row, k in enumerate(batch["__index__"].tolist()):
            got[k] = (batch["tokens"][row], batch["position_ids"][row])
    assert sorted(got) == list(range(len(expected)))
    for k, (tokens, positions) in got.items():
        np.testing.assert_array_equal(tokens, expected[k][0])
        np.testing.assert_array_equal(positions, expected[k][2])
    # Offsets that decrease are refused at start-up, naming the object.
    os.makedirs(tmp_path / "bad")
    np.save(tmp_path / "bad" / "v.npy", np.arange(5, dtype=np.uint8))
    np.save(tmp_path / "bad" / "v.offsets.npy", np.array([0, 3, 2, 5], dtype=np.int64))
    s3.upload_dir(tmp_path / "bad", "bad")
    error = refusal(s3.env(), "--dataset", "b=s3://data/bad")
    assert "bad/v.offsets.npy" in error and "offsets[1] = 3 is above offsets[2] = 2" in error, error


def write_shards(root, shards=3, per_shard=6):
    """WebDataset shards as TarWriter writes them: image bytes, a class, JSON and an array."""
    import webdataset as wds

    rng = np.random.default_rng(12)
    os.makedirs(root)
    for shard in range(shards):
        with wds.TarWriter(str(root / f"train-{shard:04d}.tar")) as sink:
            for j in range(per_shard):
                sink.write({"__key__": f"s{shard}_{j:03d}",
                            "jpg": rng.integers(0, 256, size=int(rng.integers(1, 200_000)), dtype=np.uint8).tobytes(),
                            "cls": shard * 10 + j, "json": {"j": j},
                            "npy": rng.standard_normal((int(rng.integers(0, 5)), 3)).astype(np.float32)})


def same_samples(local, remote, dataset, shuffle="full"):
    """The remote loader serves the local one's samples, field by field, every index once."""
    def served(loader):
        out = {}
        for batch in conveyor.StreamingDataset([loader.addr], dataset, batch_size=4, shuffle=shuffle, seed=3):
            listed = {k: v.tolist() if isinstance(v, conveyor.Ragged) else v for k, v in batch.items()}
            for row, i in enumerate(batch["__index__"].tolist()):
                assert i not in out
                out[i] = {k: np.asarray(v[row]).tobytes() if not isinstance(v[row], (bytes, str)) else v[row]
                          for k, v in listed.items() if k != "__index__"}
        return out

    got, expected = served(remote), served(local)
    assert got == expected and len(got) > 0
    return got


def test_webdataset_shards_in_s3_serve_what_the_local_shards_do(tmp_path, s3, start_loader):
    write_shards(tmp_path / "shards")
    s3.upload_dir(tmp_path / "shards", "shards")
    local = start_loader({"w": tmp_path / "shards"})
    remote = start_loader({"w": "s3://data/shards"}, env=s3.env())
    assert conveyor.datasets([remote.addr])["w"] == conveyor.datasets([local.addr])["w"]
    for shuffle in ("full", "block"):
        got = same_samples(local, remote, "w", shuffle)
        assert sorted(got) == list(range(18))
    # A shard cut short is refused at start-up, naming it.
    data = (tmp_path / "shards" / "train-0001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    s3.client.upload_file(str(tmp_path / "cut.tar"), "data", "cut/train-0000.tar")
    error = refusal(s3.env(), "--dataset", "c=s3://data/cut")
    assert "cut/train-0000.tar" in error and ("truncated" in error or "damaged" in error), error


def test_zarr_groups_over_s3_serve_every_codec_and_count_their_requests(tmp_path, s3, start_loader):
    rng = np.random.default_rng(1)
    group = zarr.open_group(tmp_path / "codecs.zarr", mode="w", zarr_format=3)
    values = {}
    for name, kwargs in {
        "zstd": dict(compressors=zarr.codecs.ZstdCodec(level=3)),
        "blosc": dict(compressors=zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle")),
        "gzip": dict(compressors=zarr.codecs.GzipCodec()),
        "sharded": dict(shards=(40, 6), compressors=zarr.codecs.ZstdCodec()),
    }.items():
        data = rng.standard_normal((120, 6)).astype("float32")
        group.create_array(name, shape=data.shape, chunks=(10, 6), dtype="float32", **kwargs)[:] = data
        values[name] = data
    s3.upload_dir(tmp_path / "codecs.zarr", "codecs.zarr")
    eeg = xr.Dataset({"eeg": (("window", "channel"), rng.standard_normal((90, 4)).astype("float32")),
                      "label": (("window",), rng.integers(1, 9, 90))}, coords={"channel": ["a", "b", "c", "d"]})
    eeg.to_zarr(tmp_path / "eeg.zarr", zarr_format=2, consolidated=True)
    s3.upload_dir(tmp_path / "eeg.zarr", "eeg.zarr")

    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"c": "s3://data/codecs.zarr", "e": "s3://data/eeg.zarr"}, "--metrics-listen",
                          metrics_addr, "--chunk-cache-bytes", "0", env=s3.env())
    for shuffle in ("full", "block"):
        index, got = epoch(loader, "c", shuffle)
        assert sorted(index.tolist()) == list(range(120)), shuffle
        for name, data in values.items():
            assert got[name].tobytes() == data.tobytes(), (shuffle, name)
    info = conveyor.datasets([loader.addr])["e"]
    assert set(info.fields) == {"eeg", "label"} and set(info.coordinates) == {"channel"}
    index, got = epoch(loader, "e", "block")
    assert sorted(index.tolist()) == list(range(90))
    assert got["eeg"].tobytes() == eeg["eeg"].values.tobytes()
    text = metrics(metrics_addr)
    # Without a chunk cache every block of both epochs is fetched: at least 2 x 12 chunk GETs
    # for each of the three unsharded arrays.
    assert metric(text, "conveyor_loader_object_requests_total", dataset="c") >= 3 * 2 * 12
    assert metric(text, "conveyor_loader_object_fetched_bytes_total", dataset="e") > 0


@pytest.mark.parametrize("columns", [6, 4])
def test_a_zarr_epoch_from_s3_reads_each_chunk_with_one_get(tmp_path, s3, start_loader, columns):
    # 12 zstd chunks of 10 rows; batches of 20 rows in block shuffle need two chunks each, read
    # ahead together. Each chunk must cost one GET: no HEAD for its size, no second read by a
    # batch running beside the one that reads it. With 4 columns a chunk, each block of rows is
    # two chunks (the second half beyond the array's 6 columns), read once for the size check
    # and decoded from those bytes.
    data = np.random.default_rng(7).standard_normal((120, 6)).astype("float32")
    zarr.create_array(tmp_path / "one.zarr", shape=data.shape, chunks=(10, columns), dtype="float32",
                      compressors=zarr.codecs.ZstdCodec(level=3), zarr_format=3)[:] = data
    s3.upload_dir(tmp_path / "one.zarr", "one.zarr")
    seen = []
    proxy = FaultProxy(("127.0.0.1", s3.port), lambda n, method, path, _: seen.append((method, path)))
    try:
        loader = start_loader({"z": "s3://data/one.zarr"}, env=s3.env(AWS_ENDPOINT_URL=proxy.url))
        before = len(seen)
        index, got = epoch(loader, "z", "block", batch_size=20)
        assert sorted(index.tolist()) == list(range(120))
        assert got["one"].tobytes() == data.tobytes()
        chunk_requests = sorted(r for r in seen[before:] if "/one.zarr/c/" in r[1])
        wanted = sorted(("GET", f"/data/one.zarr/c/{i}/{j}") for i in range(12) for j in range(-(-6 // columns)))
        assert chunk_requests == wanted, chunk_requests
    finally:
        proxy.stop()


def test_s3_failures_at_start_up_are_named_and_never_show_the_secret(s3, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(10))
    s3.client.upload_file(str(tmp_path / "x.npy"), "data", "small/x.npy")
    stderr = refusal(s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"), "--dataset", "d=s3://data/small")
    assert "dataset 'd' (s3://data/small)" in stderr and "was denied" in stderr and "AWS_SECRET_ACCESS_KEY" in stderr
    assert "not-the-secret" not in stderr and s3.secret not in stderr, stderr
    # No credentials at all: the store's last resort, the instance metadata service, is not
    # there (a closed local port stands in for 169.254.169.254 off EC2).
    bare = s3.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None,
                  AWS_WEB_IDENTITY_TOKEN_FILE=None, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=None,
                  AWS_METADATA_ENDPOINT="http://127.0.0.1:9")
    stderr = refusal(bare, "--dataset", "d=s3://data/small",
                     "--io-retries", "1", "--io-timeout", "2s")
    assert "dataset 'd' (s3://data/small): no credentials found to read the prefix" in stderr, stderr
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in stderr and "--s3-anonymous" in stderr, stderr
    assert "was denied" not in stderr and "unreachable" not in stderr, stderr
    stderr = refusal(s3.env(), "--dataset", "d=s3://no-such-bucket/x")
    assert "the bucket does not exist" in stderr, stderr
    stderr = refusal(s3.env(), "--dataset", "d=s3://data/nothing-here")
    assert "holds no .npy objects and no Zarr metadata" in stderr, stderr
    stderr = refusal(s3.env(AWS_ENDPOINT_URL="http://127.0.0.1:9"), "--dataset", "d=s3://data/small",
                     "--io-retries", "1", "--io-timeout", "2s")
    assert "the endpoint is unreachable" in stderr and "--s3-endpoint" in stderr, stderr
    assert s3.secret not in stderr


def test_a_missing_chunk_object_fails_only_its_batches(tmp_path, s3, start_loader):
    group = zarr.open_group(tmp_path / "holes.zarr", mode="w", zarr_format=3)
    group.create_array("x", shape=(40, 3), chunks=(10, 3), dtype="int32")[:] = np.arange(120).reshape(40, 3)
    s3.upload_dir(tmp_path / "holes.zarr", "holes.zarr")
    s3.client.delete_object(Bucket="data", Key="holes.zarr/x/c/2/0")
    loader = start_loader({"h": "s3://data/holes.zarr"}, env=s3.env())
    result = subprocess.run([binary("trainer-client"), "stream", "--loader", loader.addr, "--dataset", "h",
                             "--batch-size", "10", "--shuffle", "block"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "chunk x/c/2/0 is missing" in result.stderr and "rows 20..30" in result.stderr, result.stderr
    # The loader lives on: it answers, and fails the same batch again the same way.
    assert loader.proc.poll() is None
    assert conveyor.datasets([loader.addr])["h"].num_samples == 40
    with pytest.raises(conveyor.BatchError, match="rows 20..30"):
        list(conveyor.StreamingDataset([loader.addr], "h", batch_size=10, shuffle="none"))


class Nginx:
    """nginx serving `root` with range requests and WebDAV listings (PROPFIND), as a static file
    server would serve a dataset."""

    def __init__(self, root, tmp):
        self.port = free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
user root;
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{}}
http {{
  access_log {tmp}/access.log;
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    location / {{ dav_ext_methods PROPFIND OPTIONS; }}
  }}
}}
""")
        self.access_log = os.path.join(tmp, "access.log")
        self.proc = subprocess.Popen(["nginx", "-c", conf], stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)  # polling for the port, bounded by the deadline
        raise RuntimeError("nginx did not listen within 30 s")

    def stop(self):
        # SIGTERM: the master stops its worker too (SIGKILL would end the master alone and leave
        # the worker running, holding the port, after the tests).
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FaultProxy:
    """An HTTP proxy in front of `backend` that answers some requests itself: `fault(n, method,
    path, range)` (n counts requests, range is the Range header) returns None (forward), a status such as "500" or "503" (an injected server error) or
    "reset" (the connection closed with a TCP reset)."""

    def __init__(self, backend, fault):
        proxy = self
        self.faults = 0
        self.count = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                with proxy.lock:
                    proxy.count += 1
                    verdict = fault(proxy.count, self.command, self.path, self.headers.get("Range"))
                    proxy.faults += verdict is not None
                if verdict == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if verdict is not None:
                    message = b"injected failure"
                    self.send_response(int(verdict))
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection(*backend, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                head = self.command == "HEAD"  # its Content-Length is the object's, with no body
                for key, value in response.getheaders():
                    skip = ("connection", "keep-alive", "transfer-encoding") + (() if head else ("content-length",))
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PROPFIND = handle_any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = Nginx(root, str(tmp_path))
    yield root, server
    server.stop()


def write_chess(root, n=100, shard=50):
    board = np.arange(n * 64, dtype="<i2").reshape(n, 8, 8)
    (root / "chess").mkdir()
    for i, start in enumerate(range(0, n, shard)):
        np.save(root / "chess" / f"board-{i:05d}.npy", board[start:start + shard])
    np.save(root / "chess" / "label.npy", np.arange(n, dtype=">i8"))
    return board


def test_http_servers_serve_npy_directories_and_zarr_groups(web, start_loader):
    root, server = web
    board = write_chess(root)
    eeg = xr.Dataset({"eeg": (("window", "channel"), np.random.default_rng(3).standard_normal((70, 4)))},
                     coords={"channel": ["a", "b", "c", "d"]})
    eeg.to_zarr(root / "eeg.zarr", zarr_format=3, consolidated=True)
    loader = start_loader({"c": f"{server.url}/chess", "e": f"{server.url}/eeg.zarr/"})
    for shuffle in ("full", "block"):
        index, got = epoch(loader, "c", shuffle, batch_size=12)
        assert sorted(index.tolist()) == list(range(100)), shuffle
        assert got["board"].tobytes() == board.tobytes() and np.array_equal(got["label"], np.arange(100))
        index, got = epoch(loader, "e", shuffle, batch_size=12)
        assert sorted(index.tolist()) == list(range(70)) and got["eeg"].tobytes() == eeg["eeg"].values.tobytes()
    # Opening the format-3 group probed no format-2 documents at its root and fetched its
    # zarr.json twice (the loader's own read and zarrs' group open; it was three times).
    with open(server.access_log) as f:
        root = [line for line in f if "/eeg.zarr/" in line and "/eeg.zarr/eeg/" not in line]
    assert not [line for line in root if "/eeg.zarr/.zarray" in line or "/eeg.zarr/.zgroup" in line], root
    assert sum('"GET /eeg.zarr/zarr.json ' in line for line in root) == 2, root


def test_an_image_folder_over_http_serves_what_the_local_folder_does(web, tmp_path, start_loader):
    root, server = web
    write_image_tree(root / "folder")
    same_folder(start_loader({"f": root / "folder"}), start_loader({"f": f"{server.url}/folder"}), root / "folder")


def test_webdataset_shards_over_http_serve_what_the_local_shards_do(web, start_loader):
    root, server = web
    write_shards(root / "shards", shards=2)
    got = same_samples(start_loader({"w": root / "shards"}), start_loader({"w": f"{server.url}/shards"}), "w", "block")
    assert sorted(got) == list(range(12))


def test_transient_500s_and_resets_are_retried_and_the_epoch_stays_exactly_once(web, start_loader):
    root, server = web
    board = write_chess(root, n=200, shard=64)
    # After start-up, the first attempt of every 3rd distinct request gets a 500 and of every 7th
    # a reset connection; a retry of it goes through (the failures are transient).
    seen = set()

    def transient(n, method, path, byte_range):
        if n <= 10 or (method, path, byte_range) in seen:
            return None
        seen.add((method, path, byte_range))
        return "500" if len(seen) % 3 == 0 else "reset" if len(seen) % 7 == 0 else None

    proxy = FaultProxy(("127.0.0.1", server.port), transient)
    try:
        loader = start_loader({"c": f"{proxy.url}/chess"}, "--io-retries", "6", "--io-timeout", "5s")
        for shuffle in ("full", "block"):
            index, got = epoch(loader, "c", shuffle, batch_size=16)
            assert sorted(index.tolist()) == list(range(200)), shuffle
            assert got["board"].tobytes() == board.tobytes(), shuffle
        assert proxy.faults >= 10, f"only {proxy.faults} faults were injected"
    finally:
        proxy.stop()


def test_a_read_that_keeps_failing_fails_only_the_batches_that_need_it(web, start_loader):
    root, server = web
    write_chess(root, n=100, shard=50)
    ranged_get = lambda method, path: method == "GET" and path.endswith("board-00001.npy")
    proxy = FaultProxy(("127.0.0.1", server.port), lambda n, method, path, _: "500" if ranged_get(method, path) and n > 8 else None)
    try:
        loader = start_loader({"c": f"{proxy.url}/chess"}, "--io-retries", "1", "--io-timeout", "2s")
        # A 500 is the store's transient kind of failure: the client asks again for
        # --storage-retry-timeout, then fails naming the object and the store's answer.
        started = time.monotonic()
        result = subprocess.run([binary("trainer-client"), "stream", "--loader", loader.addr, "--dataset", "c",
                                 "--batch-size", "10", "--shuffle", "none", "--storage-retry-timeout", "2s"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and time.monotonic() - started < 60
        assert "KIND_STORAGE_UNAVAILABLE" in result.stderr, result.stderr
        assert "board-00001.npy" in result.stderr and "500" in result.stderr, result.stderr
        assert "dataset 'c', field 'board'" in result.stderr, result.stderr
        assert loader.proc.poll() is None, "the loader goes on"
        # The first shard's batches are served: the first 5 batches arrive before the failure.
        ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=10, shuffle="none", prefetch=1,
                                       storage_retry_timeout=2)
        assert conveyor.datasets([loader.addr])["c"].num_samples == 100
        with pytest.raises(conveyor.BatchError, match="board-00001.npy"):
            list(ds)
    finally:
        proxy.stop()


class MotoNoAuth(Moto):
    """moto without authentication, restartable on the same port (its objects are lost)."""

    def __init__(self, tmp, port=0):
        super().__init__(tmp, port)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="x", aws_secret_access_key="y")

    def upload(self, local, prefix):
        self.client.create_bucket(Bucket="data")
        for name in sorted(os.listdir(local)):
            self.client.upload_file(os.path.join(local, name), "data", f"{prefix}/{name}")


def test_the_s3_server_killed_and_restarted_mid_epoch_still_delivers_the_epoch_exactly_once(tmp_path, start_loader):
    board = write_chess(tmp_path, n=400, shard=100)
    server = MotoNoAuth(str(tmp_path))
    server.upload(tmp_path / "chess", "chess")
    # moto keeps its objects in memory: while it is down and being filled again, the proxy in
    # front of it answers 503 as a load balancer would (connection errors come through as resets).
    restarting = threading.Event()
    proxy = FaultProxy(("127.0.0.1", server.port), lambda n, method, path, _: "503" if restarting.is_set() else None)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": proxy.url}
    try:
        # object_store's backoff is jittered (each wait drawn between 50 ms and up to twice the
        # last, at most 2 s): 10 retries were once spent in 0.9 s while a loaded machine took
        # longer to restart moto. 40 cover a restart of well over 10 s.
        loader = start_loader({"c": "s3://data/chess"}, "--io-retries", "40", "--io-timeout", "3s", env=env)
        ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=20, shuffle="full", seed=1, prefetch=1)
        batches = []
        for batch in ds:
            batches.append(batch)
            if len(batches) == 3:
                restarting.set()
                server.kill()
                server = MotoNoAuth(str(tmp_path), port=server.port)
                server.upload(tmp_path / "chess", "chess")
                restarting.clear()
        index = np.concatenate([b["__index__"] for b in batches])
        assert sorted(index.tolist()) == list(range(400)), "exactly once across the restart"
        got = np.concatenate([b["board"] for b in batches])
        assert got.tobytes() == board[index].tobytes()
        assert proxy.faults > 0, "requests arrived while the server was down"
    finally:
        proxy.stop()
        server.kill()


def test_a_store_outage_longer_than_the_loaders_retries_costs_time_not_the_run(tmp_path, start_loader):
    board = write_chess(tmp_path, n=400, shard=100)
    server = MotoNoAuth(str(tmp_path))
    server.upload(tmp_path / "chess", "chess")
    # Once the first data GETs have passed, the next 40 GETs of board rows answer 503: with
    # --io-retries 2 each loader read gives up after 3 of them, so several batches come back as
    # transient storage failures, which the client asks for again.
    outage = {"left": 40}

    def fault(n, method, path, range_):
        if method == "GET" and "board-" in path and range_ and n > 12 and outage["left"] > 0:
            outage["left"] -= 1
            return "503"
        return None

    proxy = FaultProxy(("127.0.0.1", server.port), fault)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": proxy.url}
    try:
        metrics_addr = f"127.0.0.1:{free_port()}"
        loader = start_loader({"c": "s3://data/chess"}, "--io-retries", "2", "--metrics-listen", metrics_addr,
                              env=env)
        index, got = epoch(loader, "c", "full", batch_size=20, seed=2)
        assert sorted(index.tolist()) == list(range(400)), "every sample once through the outage"
        assert got["board"].tobytes() == board.tobytes()
        assert outage["left"] == 0, "the outage happened"
        failed = metric(metrics(metrics_addr), "conveyor_loader_request_errors_total", kind="storage_unavailable")
        assert failed >= 1, "batches were answered as transient storage failures and asked for again"
        # A client that gives up at once fails naming the store's answer.
        outage["left"] = 1000
        ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=20, storage_retry_timeout=0.5)
        with pytest.raises(conveyor.BatchError, match="KIND_STORAGE_UNAVAILABLE.*503"):
            list(ds)
    finally:
        proxy.stop()
        server.kill()


@pytest.mark.parametrize("replacement", ["same size", "64 bytes longer"])
def test_an_object_replaced_mid_epoch_fails_its_batches_naming_it_and_never_mixes_versions(tmp_path, start_loader,
                                                                                          replacement):
    board = write_chess(tmp_path, n=400, shard=100)
    server = MotoNoAuth(str(tmp_path))
    server.upload(tmp_path / "chess", "chess")
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint}
    try:
        loader = start_loader({"c": "s3://data/chess"}, env=env)
        ds = conveyor.StreamingDataset([loader.addr], "c", batch_size=20, shuffle="none", prefetch=1)
        batches = []
        with pytest.raises(conveyor.BatchError) as caught:
            for batch in ds:
                batches.append(batch)
                if len(batches) == 2:
                    # Rows 200..299 are replaced while the loader serves rows 40..59.
                    path = tmp_path / "new.npy"
                    np.save(path, board[200:300] + 1)
                    if replacement == "64 bytes longer":  # a longer .npy header: every row shifts
                        path.write_bytes(padded_npy_header(path.read_bytes(), 64))
                    server.client.upload_file(str(path), "data", "chess/board-00002.npy")
        message = str(caught.value)
        assert "s3://data/chess/board-00002.npy changed since the loader listed it" in message, message
        assert "restart the loader" in message, message
        index = np.concatenate([b["__index__"] for b in batches])
        assert index.max() < 200, "no row of the replaced object was served"
        got = np.concatenate([b["board"] for b in batches])
        assert got.tobytes() == board[index].tobytes(), "what was served is the listed version"
        # A restarted loader serves the new version.
        restarted = start_loader({"c": "s3://data/chess"}, env=env)
        served = epoch_rows(restarted, "c")
        assert served[200:300].tobytes() == (board[200:300] + 1).tobytes()
        assert served[:200].tobytes() == board[:200].tobytes()
    finally:
        server.kill()


def padded_npy_header(data, extra):
    """A version 1.0 .npy file's bytes with its header `extra` bytes longer (spaces), as another
    writer might lay it out: the same array, its rows `extra` bytes further on."""
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10:10 + header_len].rstrip(b"\n") + b" " * extra + b"\n"
    return data[:8] + len(header).to_bytes(2, "little") + header + data[10 + header_len:]


def epoch_rows(loader, name):
    index, fields = epoch(loader, name, "none", batch_size=50)
    return fields["board"]


def test_the_disk_cache_serves_later_epochs_and_restarts_and_refetches_a_damaged_entry(web, tmp_path, start_loader):
    root, server = web
    board = write_chess(root, n=300, shard=100)
    eeg = xr.Dataset({"eeg": (("window", "channel"), np.random.default_rng(4).standard_normal((90, 8)))})
    eeg.to_zarr(root / "eeg.zarr", zarr_format=3, consolidated=True, encoding={"eeg": {"chunks": (10, 8)}})
    proxy = FaultProxy(("127.0.0.1", server.port), lambda *_: None)  # counts requests
    cache = tmp_path / "cache"
    datasets = {"c": f"{proxy.url}/chess", "e": f"{proxy.url}/eeg.zarr"}
    flags = ("--disk-cache", cache, "--chunk-cache-bytes", 0)

    def both_epochs(loader, seed):
        for name, shuffle, want in (("c", "full", board), ("e", "block", eeg["eeg"].values)):
            index, got = epoch(loader, name, shuffle, batch_size=16, seed=seed)
            assert sorted(index.tolist()) == list(range(len(want))), name
            field = "board" if name == "c" else "eeg"
            assert got[field].tobytes() == want.tobytes(), name

    def requests_of_a_fresh_loader(seed):
        """Store requests of a loader started on the cache and run through both datasets."""
        before = proxy.count
        loader = start_loader(datasets, *flags)
        both_epochs(loader, seed)
        loader.stop()
        return proxy.count - before

    try:
        metrics_addr = f"127.0.0.1:{free_port()}"
        loader = start_loader(datasets, *flags, "--metrics-listen", metrics_addr)
        both_epochs(loader, seed=1)
        warm = proxy.count
        both_epochs(loader, seed=2)
        assert proxy.count == warm, "a second epoch is served without touching the store"
        assert metric(metrics(metrics_addr), "conveyor_loader_disk_cache_hit_bytes_total", dataset="c") >= board.nbytes
        stderr = refusal({}, "--dataset", f"c={proxy.url}/chess", "--disk-cache", cache)
        assert "is in use by another loader" in stderr, stderr
        loader.stop()

        # A restarted loader finds the entries: only start-up metadata requests reach the store.
        intact = requests_of_a_fresh_loader(seed=3)
        # One entry truncated: it fails its check and exactly it is fetched again.
        entry = sorted(cache.glob("*.entry"), key=lambda p: p.stat().st_size)[-1]
        with open(entry, "r+b") as f:
            f.truncate(entry.stat().st_size - 1)
        assert requests_of_a_fresh_loader(seed=4) == intact + 1
        assert requests_of_a_fresh_loader(seed=5) == intact
    finally:
        proxy.stop()


def test_disk_cache_entries_truncated_or_rotted_under_a_running_loader_are_refetched_not_served(
        web, tmp_path, start_loader):
    root, server = web
    board = write_chess(root, n=300, shard=100)
    cache = tmp_path / "cache"
    metrics_addr = f"127.0.0.1:{free_port()}"
    loader = start_loader({"c": f"{server.url}/chess"}, "--disk-cache", cache, "--metrics-listen", metrics_addr)

    def exact_epoch(seed):
        index, got = epoch(loader, "c", "full", batch_size=16, seed=seed)
        assert sorted(index.tolist()) == list(range(300))
        assert got["board"].tobytes() == board.tobytes(), "every row as stored"

    exact_epoch(seed=1)  # fills the cache
    exact_epoch(seed=2)  # warm: the entries are open in the loader now
    entries = sorted(cache.glob("*.entry"))  # row blocks of each field's shards, and .npy headers
    assert len(entries) >= 3
    refused = lambda: metric(metrics(metrics_addr), "conveyor_loader_disk_cache_refused_total")  # noqa: E731
    assert refused() == 0
    # Every entry cut to half its size while the loader holds it open (a mapped entry would
    # fault the loader with SIGBUS here).
    for entry in entries:
        with open(entry, "r+b") as f:
            f.truncate(entry.stat().st_size // 2)
    exact_epoch(seed=3)
    assert loader.proc.poll() is None, "the loader is alive"
    after_truncation = refused()
    # Each entry an epoch reads (every row block; headers are read at start-up only) is refused
    # once, then fetched again whole.
    assert 3 <= after_truncation <= len(entries), after_truncation
    # One bit flipped in each entry's payload, size and modification time kept (bit rot).
    for entry in sorted(cache.glob("*.entry")):
        stat = entry.stat()
        data = bytearray(entry.read_bytes())
        payload_len = int.from_bytes(data[4:12], "little")
        data[len(data) - payload_len + payload_len // 2] ^= 0x10
        entry.write_bytes(bytes(data))
        os.utime(entry, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    exact_epoch(seed=4)
    after_rot = refused()
    assert after_rot - after_truncation >= 3, "each damaged row block refused at the read that met the damage"
    exact_epoch(seed=5)
    assert refused() == after_rot and loader.proc.poll() is None


def test_the_disk_cache_stays_within_its_budget(web, tmp_path, start_loader):
    root, server = web
    board = write_chess(root, n=3000, shard=1000)  # 384 KiB of boards in 3 objects
    cache = tmp_path / "cache"
    loader = start_loader({"c": f"{server.url}/chess"}, "--disk-cache", cache, "--disk-cache-bytes", 300 << 10)
    index, got = epoch(loader, "c", "full", batch_size=100)
    assert sorted(index.tolist()) == list(range(3000)) and got["board"].tobytes() == board.tobytes()
    held = sum(p.stat().st_size for p in cache.glob("*.entry"))
    assert 0 < held <= (300 << 10) + 4096, f"{held} bytes in the cache"
