"""Object-storage benchmark: a loader serving s3:// datasets from a loopback S3 server, beside the
raw throughput of the same server for concurrent ranged GETs of the same bytes, measured in the
same run; then the loader with a warm --disk-cache beside the local-disk loader on the same data.

usage: python bench/object_storage.py [--mib 256] [--runs 3] [--out bench/out]

The S3 server is moto's (tests/requirements.txt; SigV4, the real S3 API, but slow: its speed
bounds both the raw and the loader numbers). `--server s3s-fs` uses s3s-fs instead (cargo
install s3s-fs@0.14.1 --features binary), which serves the directory without an upload, but
0.14.1 spends ~200 ms on every GET of a 64 MiB object whatever the range (it appears to hash
the whole object), so shuffled row reads crawl. Needs release binaries (cargo build --release --workspace), numpy, zarr, boto3.
Writes OUT/object_storage.json and OUT/object_storage.md.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
import numpy as np
import zarr

from common import AnonSampler, conveyor_run, start_loader, summary, write_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = (3, 64, 64)  # uint8, 12 KiB a sample
EEG = (16, 200)  # float32, 12.5 KiB a sample
EEG_CHUNK = 64
KEY, SECRET = "benchkey", "benchsecret"
# Warm disk cache beside local disk: both loaders stream one epoch first (filling the cache,
# mapping the local files), then this many epochs in one stream, which is what is measured
# (one epoch of a small dataset lasts tens of milliseconds: too short to time alone).
STEADY_EPOCHS = 20
# Their decoded-chunk cache: room for the block-shuffle window (8 blocks of 0.8 MB), not for the
# dataset, so that each epoch reads and decodes chunks again (from the disk cache or local disk)
# rather than both loaders serving the same in-memory chunks.
STEADY_CHUNK_CACHE = 8 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(root, mib):
    """`root/data/images/{image,label}.npy` and `root/data/eeg.zarr` (zstd level 1), `mib` each."""
    bucket = os.path.join(root, "data")
    images = os.path.join(bucket, "images")
    n_img = (mib << 20) // int(np.prod(IMAGE))
    n_eeg = (mib << 20) // (int(np.prod(EEG)) * 4) // EEG_CHUNK * EEG_CHUNK
    marker = os.path.join(root, f"done-{mib}")
    if not os.path.exists(marker):
        shutil.rmtree(bucket, ignore_errors=True)
        os.makedirs(images)
        rng = np.random.default_rng(0)
        arr = np.lib.format.open_memmap(os.path.join(images, "image.npy"), mode="w+", dtype=np.uint8,
                                        shape=(n_img, *IMAGE))
        for start in range(0, n_img, 4096):
            stop = min(n_img, start + 4096)
            arr[start:stop] = rng.integers(0, 256, size=(stop - start, *IMAGE), dtype=np.uint8)
        arr.flush()
        del arr
        np.save(os.path.join(images, "label.npy"), np.arange(n_img, dtype=np.int64))
        group = zarr.open_group(os.path.join(bucket, "eeg.zarr"), mode="w", zarr_format=3)
        eeg = group.create_array("eeg", shape=(n_eeg, *EEG), chunks=(EEG_CHUNK, *EEG), dtype="float32",
                                 compressors=zarr.codecs.ZstdCodec(level=1))
        for start in range(0, n_eeg, 4096):
            stop = min(n_eeg, start + 4096)
            eeg[start:stop] = rng.standard_normal((stop - start, *EEG), dtype=np.float32)
        open(marker, "w").close()
    return n_img, n_eeg


class S3:
    """s3s-fs serving `root` (bucket = a directory), or moto with the files uploaded."""

    def __init__(self, root, server):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(root, "s3.log"), "w")
        s3s = shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
        if server == "s3s-fs":
            self.kind = "s3s-fs"
            self.proc = subprocess.Popen([s3s, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", KEY,
                                          "--secret-key", SECRET, root], stdout=self.log, stderr=self.log)
        else:
            self.kind = "moto"
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(self.port)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} did not start; see {self.log.name}")
                time.sleep(0.1)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id=KEY, aws_secret_access_key=SECRET)
        if self.kind == "moto":
            self.client.create_bucket(Bucket="data")
            for base, _, files in os.walk(os.path.join(root, "data")):
                for name in files:
                    path = os.path.join(base, name)
                    self.client.upload_file(path, "data", os.path.relpath(path, os.path.join(root, "data")))

    def env(self):
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def raw_ranged_gets(s3, keys, piece=1 << 20, concurrency=16):
    """Bytes/s of `concurrency` threads GETting the objects `keys` in `piece`-byte ranges."""
    jobs = []
    for key in keys:
        size = s3.client.head_object(Bucket="data", Key=key)["ContentLength"]
        jobs += [(key, start, min(size, start + piece) - 1) for start in range(0, size, piece)]

    def get(job):
        key, first, last = job
        return len(s3.client.get_object(Bucket="data", Key=key, Range=f"bytes={first}-{last}")["Body"].read())

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(get, jobs))
    return total / (time.perf_counter() - start)


def raw_row_gets(s3, n, header_bytes, seed, concurrency=16):
    """Bytes/s of `concurrency` threads GETting the image rows of one full-shuffle epoch, one
    ranged GET per row: the same bytes, at the granularity the loader needs them."""
    row = int(np.prod(IMAGE))
    order = np.random.default_rng(seed).permutation(n)

    def get(index):
        first = header_bytes + int(index) * row
        return len(s3.client.get_object(Bucket="data", Key="images/image.npy",
                                        Range=f"bytes={first}-{first + row - 1}")["Body"].read())

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(get, order))
    return total / (time.perf_counter() - start)


def metric(addr, name, dataset):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    match = re.search(rf'^{name}\{{dataset="{dataset}"\}} (\d+)$', text, re.M)
    return int(match.group(1)) if match else 0


def loader_epoch(datasets, dataset, shuffle, batch, env, extra=(), epochs=1, seed=0, measured=1):
    """One loader, `epochs - 1` epochs streamed first (warming it up), then `measured` epochs in
    one stream; returns that stream's report plus the loader's object requests and fetched bytes
    during it."""
    metrics_addr = f"127.0.0.1:{free_port()}"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        loader, addr = start_loader(datasets, ["--metrics-listen", metrics_addr, *map(str, extra)])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    sampler = AnonSampler(loader.pid)
    sampler.start()
    try:
        for e in range(epochs):
            before = (metric(metrics_addr, "conveyor_loader_object_requests_total", dataset),
                      metric(metrics_addr, "conveyor_loader_object_fetched_bytes_total", dataset))
            stats = os.path.join(ROOT, "bench", "out", "object-stats.json")
            last = e == epochs - 1
            report = conveyor_run([addr], dataset, stats, ["--batch-size", str(batch), "--shuffle", shuffle,
                                                           "--seed", str(seed), "--epoch", str(e),
                                                           "--epochs", str(measured if last else 1)])
        report["requests"] = metric(metrics_addr, "conveyor_loader_object_requests_total", dataset) - before[0]
        report["fetched"] = metric(metrics_addr, "conveyor_loader_object_fetched_bytes_total", dataset) - before[1]
    finally:
        sampler.stop.set()
        sampler.join()
        loader.terminate()
        loader.wait(timeout=30)
    report["loader_anon_mib"] = sampler.peak_kib / 1024
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="size of each dataset")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--server", choices=["moto", "s3s-fs"], default="moto")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args()
    root = os.path.join(args.out, "s3root")
    os.makedirs(root, exist_ok=True)
    n_img, n_eeg = make(root, args.mib)
    s3 = S3(root, args.server)
    local = {"images": os.path.join(root, "data", "images"), "eeg": os.path.join(root, "data", "eeg.zarr")}
    remote = {"images": "s3://data/images", "eeg": "s3://data/eeg.zarr"}
    eeg_keys = [f"eeg.zarr/eeg/c/{i}/0/0" for i in range(n_eeg // EEG_CHUNK)]
    keys = {"images": ["images/image.npy", "images/label.npy"], "eeg": eeg_keys}
    header_bytes = np.load(os.path.join(root, "data", "images", "image.npy"), mmap_mode="r").offset
    rows = {k: [] for k in ("raw_rows", "raw_images", "raw_eeg", "cold_images", "cold_eeg", "coldcache_images",
                            "warm_images", "warm1m_images", "local_images", "warm_eeg", "local_eeg")}
    detail = {}
    try:
        for run in range(args.runs):
            raw_img = raw_ranged_gets(s3, keys["images"])
            rows["raw_rows"].append(raw_row_gets(s3, n_img, header_bytes, run))
            cold_img = loader_epoch(remote, "images", "full", args.batch, s3.env(), seed=run)
            raw_eeg = raw_ranged_gets(s3, keys["eeg"])
            cold_eeg = loader_epoch(remote, "eeg", "block", args.batch, s3.env(), ["--chunk-cache-bytes", 64 << 20],
                                    seed=run)
            cache = os.path.join(args.out, "disk-cache")
            shutil.rmtree(cache, ignore_errors=True)
            # A cold epoch that fills an empty disk cache in 1 MiB blocks (the dataset fits it).
            coldcache_img = loader_epoch(remote, "images", "full", args.batch, s3.env(),
                                         ["--disk-cache", cache, "--disk-cache-block-bytes", 1 << 20], seed=run)
            # The same cache warm, in a restarted loader: its first epoch checks each entry whole
            # (no store request), then the measured epochs read the entries' maps.
            warm1m_img = loader_epoch(remote, "images", "full", args.batch, s3.env(),
                                      ["--disk-cache", cache, "--disk-cache-block-bytes", 1 << 20], epochs=2, seed=run,
                                      measured=STEADY_EPOCHS)
            shutil.rmtree(cache, ignore_errors=True)
            warm_img = loader_epoch(remote, "images", "full", args.batch, s3.env(),
                                    ["--disk-cache", cache, "--disk-cache-block-bytes", 64 << 10], epochs=2,
                                    seed=run, measured=STEADY_EPOCHS)
            local_img = loader_epoch(local, "images", "full", args.batch, {}, epochs=2, seed=run,
                                     measured=STEADY_EPOCHS)
            shutil.rmtree(cache, ignore_errors=True)
            warm_eeg = loader_epoch(remote, "eeg", "block", args.batch, s3.env(),
                                    ["--disk-cache", cache, "--chunk-cache-bytes", STEADY_CHUNK_CACHE], epochs=2,
                                    seed=run, measured=STEADY_EPOCHS)
            local_eeg = loader_epoch(local, "eeg", "block", args.batch, {}, ["--chunk-cache-bytes", STEADY_CHUNK_CACHE],
                                     epochs=2, seed=run, measured=STEADY_EPOCHS)
            for name, value in (("raw_images", raw_img), ("raw_eeg", raw_eeg)):
                rows[name].append(value)
            for name, report in (("cold_images", cold_img), ("cold_eeg", cold_eeg), ("coldcache_images", coldcache_img),
                                 ("warm_images", warm_img), ("warm1m_images", warm1m_img),
                                 ("local_images", local_img), ("warm_eeg", warm_eeg), ("local_eeg", local_eeg)):
                rows[name].append(report["bytes_per_s"])
                detail.setdefault(name, []).append(report)
            batches_img = -(-n_img // args.batch)
            batches_eeg = -(-n_eeg // args.batch)
            print(f"run {run}: raw {raw_img / 1e6:.0f} MB/s (rows {rows['raw_rows'][-1] / 1e6:.0f}), images cold {cold_img['bytes_per_s'] / 1e6:.0f} MB/s "
                  f"({cold_img['requests'] / batches_img:.1f} requests/batch, amplification "
                  f"{cold_img['fetched'] / max(1, cold_img['bytes']):.2f}); cold into a 1 MiB-block disk cache "
                  f"{coldcache_img['bytes_per_s'] / 1e6:.0f} MB/s ({coldcache_img['requests'] / batches_img:.2f} requests/batch, "
                  f"amplification {coldcache_img['fetched'] / max(1, coldcache_img['bytes']):.2f}); warm {warm_img['bytes_per_s'] / 1e6:.0f} "
                  f"(1 MiB blocks {warm1m_img['bytes_per_s'] / 1e6:.0f}) vs local {local_img['bytes_per_s'] / 1e6:.0f} MB/s; eeg raw {raw_eeg / 1e6:.0f}, cold "
                  f"{cold_eeg['bytes_per_s'] / 1e6:.0f} MB/s ({cold_eeg['requests'] / batches_eeg:.1f} requests/batch), "
                  f"warm {warm_eeg['bytes_per_s'] / 1e6:.0f} vs local {local_eeg['bytes_per_s'] / 1e6:.0f} MB/s",
                  flush=True)
    finally:
        s3.stop()
    med = {k: summary(v)["median"] for k, v in rows.items()}
    result = {
        "server": s3.kind, "mib": args.mib, "batch": args.batch, "runs": args.runs,
        "bytes_per_s": {k: summary(v) for k, v in rows.items()},
        "cold_vs_raw": {"images": med["cold_images"] / med["raw_images"], "eeg": med["cold_eeg"] / med["raw_eeg"],
                        "images_into_disk_cache": med["coldcache_images"] / med["raw_images"],
                        "images_vs_raw_rows": med["cold_images"] / med["raw_rows"]},
        "warm_vs_local": {"images": med["warm_images"] / med["local_images"],
                          "images_1mib_blocks": med["warm1m_images"] / med["local_images"],
                          "eeg": med["warm_eeg"] / med["local_eeg"]},
        "requests_per_batch": {
            "images": summary([r["requests"] / -(-n_img // args.batch) for r in detail["cold_images"]]),
            "images_into_disk_cache": summary([r["requests"] / -(-n_img // args.batch)
                                               for r in detail["coldcache_images"]]),
            "eeg": summary([r["requests"] / -(-n_eeg // args.batch) for r in detail["cold_eeg"]])},
        "read_amplification": {
            "images": summary([r["fetched"] / max(1, r["bytes"]) for r in detail["cold_images"]]),
            "images_into_disk_cache": summary([r["fetched"] / max(1, r["bytes"]) for r in detail["coldcache_images"]]),
            "eeg": summary([r["fetched"] / max(1, r["bytes"]) for r in detail["cold_eeg"]])},
        "warm_requests": {"images": [r["requests"] for r in detail["warm_images"]],
                          "images_1mib_blocks": [r["requests"] for r in detail["warm1m_images"]],
                          "eeg": [r["requests"] for r in detail["warm_eeg"]]},
    }
    with open(os.path.join(args.out, "object_storage.json"), "w") as f:
        json.dump(result, f, indent=2)
    mmm = lambda s: " / ".join(f"{s[k] / 1e6:.3g}" for k in ("min", "median", "max"))
    b = result["bytes_per_s"]
    lines = [
        f"Server: {s3.kind} on loopback; {args.mib} MiB per dataset: images [N,3,64,64] uint8 .npy (full shuffle), "
        f"EEG [N,16,200] float32 Zarr, zstd 1, {EEG_CHUNK}-sample chunks (block shuffle); batch {args.batch}; "
        f"{args.runs} runs, MB/s min / median / max. Warm and local EEG loaders decode chunks every epoch "
        f"(--chunk-cache-bytes {STEADY_CHUNK_CACHE}, below the dataset's size).",
        "",
        "| case | images (.npy, full) | EEG (Zarr, block) |",
        "|---|---|---|",
        f"| raw: 16 concurrent 1 MiB ranged GETs (boto3) | {mmm(b['raw_images'])} | {mmm(b['raw_eeg'])} |",
        f"| raw: 16 concurrent ranged GETs, one per shuffled row (boto3) | {mmm(b['raw_rows'])} | |",
        f"| loader, cold (no disk cache) | {mmm(b['cold_images'])} | {mmm(b['cold_eeg'])} |",
        f"| loader, cold, filling an empty --disk-cache in 1 MiB blocks | {mmm(b['coldcache_images'])} | |",
        f"| loader, warm --disk-cache (64 KiB blocks; {STEADY_EPOCHS} epochs after the one that filled it) | "
        f"{mmm(b['warm_images'])} | "
        f"{mmm(b['warm_eeg'])} |",
        f"| loader, warm --disk-cache in 1 MiB blocks (the default; restarted; {STEADY_EPOCHS} epochs after a first) | "
        f"{mmm(b['warm1m_images'])} | |",
        f"| loader on local disk, same data ({STEADY_EPOCHS} epochs after a first) | {mmm(b['local_images'])} | "
        f"{mmm(b['local_eeg'])} |",
        "",
        f"Cold / raw: images {result['cold_vs_raw']['images']:.2f} (against row GETs "
        f"{result['cold_vs_raw']['images_vs_raw_rows']:.2f}; filling a 1 MiB-block disk cache "
        f"{result['cold_vs_raw']['images_into_disk_cache']:.2f}), EEG {result['cold_vs_raw']['eeg']:.2f} (aim 0.8). "
        f"Warm cache / local: images, 64 KiB blocks {result['warm_vs_local']['images']:.2f} (1 MiB blocks "
        f"{result['warm_vs_local']['images_1mib_blocks']:.2f}), EEG {result['warm_vs_local']['eeg']:.2f} "
        f"(aim 0.9). Requests per batch (cold): images {result['requests_per_batch']['images']['median']:.1f}, EEG "
        f"{result['requests_per_batch']['eeg']['median']:.1f}; read amplification (fetched / delivered): images "
        f"{result['read_amplification']['images']['median']:.2f}, EEG {result['read_amplification']['eeg']['median']:.2f}; "
        f"store requests during the warm epochs: images {result['warm_requests']['images']} (1 MiB blocks "
        f"{result['warm_requests']['images_1mib_blocks']}), EEG "
        f"{result['warm_requests']['eeg']}.",
    ]
    write_markdown(args.out, "object_storage", lines)


if __name__ == "__main__":
    main()
