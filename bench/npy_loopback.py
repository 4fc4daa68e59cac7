"""Foundation benchmark: image-like .npy samples from one loader to one client over loopback,
beside the raw TCP loopback limit (iperf3) measured in the same run.

usage: python bench/npy_loopback.py [--gib 3] [--runs 3] [--prefetch 8] [--out bench/out]

Writes OUT/npy_loopback.json and OUT/npy_loopback.md. Needs release binaries
(cargo build --release --workspace), numpy, and iperf3 (apt-get install iperf3).
"""

import argparse
import json
import os
import socket
import subprocess
import time

import numpy as np

from common import AnonSampler, conveyor_run, start_loader, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_SHAPE = (3, 64, 64)


def make_dataset(path, gib):
    n = int(gib * (1 << 30)) // int(np.prod(SAMPLE_SHAPE))
    image = os.path.join(path, "image.npy")
    if os.path.exists(image) and np.load(image, mmap_mode="r").shape[0] == n:
        return n
    os.makedirs(path, exist_ok=True)
    arr = np.lib.format.open_memmap(image, mode="w+", dtype=np.uint8, shape=(n, *SAMPLE_SHAPE))
    rng = np.random.default_rng(0)
    step = 8192
    for start in range(0, n, step):
        stop = min(n, start + step)
        arr[start:stop] = rng.integers(0, 256, size=(stop - start, *SAMPLE_SHAPE), dtype=np.uint8)
    arr.flush()
    del arr
    np.save(os.path.join(path, "label.npy"), (np.arange(n) % 1000).astype(np.int64))
    return n


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf3(seconds=5):
    """Raw TCP loopback throughput (bytes/s) measured by iperf3, the limit Conveyor is held to."""
    for _ in range(5):
        port = free_port()
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                run = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                                     capture_output=True, text=True)
                try:
                    result = json.loads(run.stdout)
                except json.JSONDecodeError:
                    result = {}
                if "sum_received" in result.get("end", {}):
                    return result["end"]["sum_received"]["bits_per_second"] / 8
                if "unable to connect" not in result.get("error", run.stderr):
                    break  # the test itself failed: try again with a fresh server
                time.sleep(0.05)  # the server is still starting
        finally:
            server.kill()
            server.wait()
    raise RuntimeError("iperf3 gave no result in 5 attempts")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data", "images")
    n = make_dataset(data, args.gib)
    sample_bytes = int(np.prod(SAMPLE_SHAPE)) + 8
    batch_bytes = args.batch * sample_bytes
    # Warm the page cache so both runs read memory, not the disk.
    subprocess.run(["cat", os.path.join(data, "image.npy")], stdout=subprocess.DEVNULL, check=True)

    loopback, conveyor, rss, anon = [], [], [], []
    for run in range(args.runs):
        loopback.append(iperf3())
        loader, addr = start_loader({"images": data})
        sampler = AnonSampler(loader.pid)
        sampler.start()
        stats = os.path.join(args.out, f"stats-{run}.json")
        report = conveyor_run([addr], "images", stats, ["--batch-size", str(args.batch), "--shuffle", "full",
                                                         "--seed", str(run), "--prefetch", str(args.prefetch)])
        sampler.stop.set()
        sampler.join()
        loader.terminate()
        loader.wait(timeout=30)
        conveyor.append(report["bytes_per_s"])
        rss.append(report["peak_rss_bytes"])
        anon.append(sampler.peak_kib * 1024)
        print(f"run {run}: loopback {loopback[-1] / 1e9:.2f} GB/s, conveyor {conveyor[-1] / 1e9:.2f} GB/s "
              f"({report['samples_per_s']:.0f} samples/s), client peak RSS {rss[-1] / 2**20:.0f} MiB, "
              f"loader peak anon RSS {anon[-1] / 2**20:.0f} MiB", flush=True)

    bound = (args.prefetch + 2) * batch_bytes + 64 * 2**20
    result = {
        "samples": n, "dataset_bytes": n * sample_bytes, "batch": args.batch, "prefetch": args.prefetch,
        "loopback_bytes_per_s": summary(loopback), "conveyor_bytes_per_s": summary(conveyor),
        "ratio": summary([c / l for c, l in zip(conveyor, loopback)]),
        "client_peak_rss_bytes": summary(rss), "client_rss_bound_bytes": bound,
        "loader_peak_anon_bytes": summary(anon),
    }
    with open(os.path.join(args.out, "npy_loopback.json"), "w") as f:
        json.dump(result, f, indent=2)
    gb = lambda s: f"{s['min'] / 1e9:.2f} / {s['median'] / 1e9:.2f} / {s['max'] / 1e9:.2f}"
    mib = lambda s: f"{s['min'] / 2**20:.0f} / {s['median'] / 2**20:.0f} / {s['max'] / 2**20:.0f}"
    table = "\n".join([
        f"Dataset: {n} samples of [3,64,64] uint8 + int64 label ({n * sample_bytes / 2**30:.1f} GiB), "
        f"batch {args.batch}, full shuffle, prefetch {args.prefetch}, {args.runs} runs (min / median / max)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| raw TCP loopback (iperf3), GB/s | {gb(result['loopback_bytes_per_s'])} |",
        f"| Conveyor delivered, GB/s | {gb(result['conveyor_bytes_per_s'])} |",
        f"| Conveyor / loopback | {result['ratio']['min']:.2f} / {result['ratio']['median']:.2f} / {result['ratio']['max']:.2f} |",
        f"| client peak RSS, MiB (bound {bound / 2**20:.0f}) | {mib(result['client_peak_rss_bytes'])} |",
        f"| loader peak anonymous RSS, MiB | {mib(result['loader_peak_anon_bytes'])} |",
    ])
    with open(os.path.join(args.out, "npy_loopback.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
