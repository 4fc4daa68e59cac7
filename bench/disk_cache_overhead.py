"""What the disk cache's per-read checks cost: a loader serving `s3://` images from a warm
`--disk-cache` (1 MiB blocks, every page it reads checked against its CRC-32C, read with pread)
beside a loader on the same files on local disk, interleaved in the same run, full shuffle,
steady epochs (see object_storage.py, whose helpers this uses).

usage: python bench/disk_cache_overhead.py [--mib 32] [--runs 5]   (release binaries, moto)
"""

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from object_storage import ROOT, S3, STEADY_EPOCHS, loader_epoch, make  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args()
    root = os.path.join(args.out, "s3root")
    os.makedirs(root, exist_ok=True)
    make(root, args.mib)
    s3 = S3(root, "moto")
    cache = os.path.join(args.out, "disk-cache")
    warm, local = [], []
    try:
        shutil.rmtree(cache, ignore_errors=True)
        flags = ["--disk-cache", cache, "--disk-cache-block-bytes", 1 << 20]
        loader_epoch({"images": "s3://data/images"}, "images", "full", args.batch, s3.env(), flags)  # fills it
        for run in range(args.runs):
            w = loader_epoch({"images": "s3://data/images"}, "images", "full", args.batch, s3.env(), flags, epochs=2,
                             seed=run, measured=STEADY_EPOCHS)
            loc = loader_epoch({"images": os.path.join(root, "data", "images")}, "images", "full", args.batch, {},
                               epochs=2, seed=run, measured=STEADY_EPOCHS)
            assert w["requests"] == 0, "the warm loader made store requests"
            warm.append(w["bytes_per_s"])
            local.append(loc["bytes_per_s"])
            print(f"run {run}: warm disk cache {w['bytes_per_s'] / 1e6:.0f} MB/s, local disk {loc['bytes_per_s'] / 1e6:.0f} "
                  f"MB/s ({w['bytes_per_s'] / loc['bytes_per_s']:.2f})", flush=True)
    finally:
        s3.stop()
    ratios = [w / loc for w, loc in zip(warm, local)]
    print(f"median: warm {statistics.median(warm) / 1e6:.0f} MB/s, local {statistics.median(local) / 1e6:.0f} MB/s, "
          f"ratio of medians {statistics.median(warm) / statistics.median(local):.2f}, per-run ratios "
          f"{' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
