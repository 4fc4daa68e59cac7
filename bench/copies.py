"""Copies per byte: one loader streaming to one client on loopback, two builds side by side.

usage: CONVEYOR_BIN_BEFORE=DIR python bench/copies.py [--runs 3] [--batches 1500] [--gib 2]

For each run, in this order: raw TCP loopback (iperf3, 3 s) and memcpy bandwidth, then for each
build (CONVEYOR_BIN_BEFORE when set, then CONVEYOR_BIN or target/release) and each case,
`trainer-client stream` of `--batches` batches of 256 fully shuffled samples:
  images          [N,3,64,64] uint8 + int64 label, without tensors (the bytes reach the client)
  images tensors  the same into CPU tensors (`--tensors`: the training loop's path)
  chess tensors   [N,12,8,8] int16 + int64 label into CPU tensors (small samples)
Both builds need trainer-client built with `--features torch`. Each case starts with its dataset
read into the page cache. Writes OUT/copies.json and OUT/copies.md (min / median / max).
"""

import argparse
import json
import os

import common
from npy_loopback import iperf3, make_dataset
from suite import gen_npy, memcpy_bandwidth, warm_page_cache

CASES = {
    "images": ("images", []),
    "images tensors": ("images", ["--tensors"]),
    "chess tensors": ("chess", ["--tensors"]),
}


def stream(bin_dir, name, path, batches, seed, extra, out):
    common.BIN = bin_dir
    proc, addr = common.start_loader({name: path}, ["--max-inflight-bytes", str(128 << 20)])
    try:
        report = common.conveyor_run([addr], name, os.path.join(out, "copies-stats.json"),
                                     ["--batch-size", "256", "--seed", str(seed), "--max-batches", str(batches),
                                      "--shuffle", "full", *extra])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return report["bytes_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=1500)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "out"))
    args = ap.parse_args()
    data = os.path.join(args.out, "data")
    paths = {"images": os.path.join(data, "copies-images"), "chess": os.path.join(data, "copies-chess")}
    make_dataset(paths["images"], args.gib)
    n_chess = int(args.gib * 2**30) // (12 * 8 * 8 * 2 + 8)
    gen_npy(paths["chess"], n_chess, {"board": ("int16", (12, 8, 8)), "label": ("int64", ())},
            lambda a, b, rng: {"board": rng.integers(0, 2, size=(b - a, 12, 8, 8), dtype="int16"),
                               "label": (rng.integers(0, 4672, size=b - a)).astype("int64")})
    builds = {}
    if os.environ.get("CONVEYOR_BIN_BEFORE"):
        builds["before"] = os.environ["CONVEYOR_BIN_BEFORE"]
    builds["after"] = os.environ.get("CONVEYOR_BIN", os.path.join(common.ROOT, "target", "release"))
    results = {"loopback": [], "memcpy": [], **{f"{b}: {c}": [] for b in builds for c in CASES}}
    for run in range(args.runs):
        results["loopback"].append(iperf3(3))
        results["memcpy"].append(memcpy_bandwidth())
        for build, bin_dir in builds.items():
            for case, (name, extra) in CASES.items():
                warm_page_cache(paths[name])
                rate = stream(bin_dir, name, paths[name], args.batches, run, extra, args.out)
                results[f"{build}: {case}"].append(rate)
                print(f"run {run}: {build}: {case}: {rate / 1e6:.0f} MB/s "
                      f"({rate / results['loopback'][-1]:.2f} of loopback)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "copies.json"), "w") as f:
        json.dump({"runs": args.runs, "batches": args.batches, "builds": builds, "results": results}, f, indent=1)
    lines = [f"{args.runs} runs of {args.batches} batches x 256 fully shuffled samples, one loader, loopback TCP",
             "", "| measure (min / median / max) | MB/s | of iperf3 loopback (same run) |", "|---|---|---|"]
    loopback = results["loopback"]
    for key, values in results.items():
        rates = "/".join(f"{v / 1e6:.0f}" for v in common.summary(values).values())
        share = "" if key in ("loopback", "memcpy") else "/".join(
            f"{v:.2f}" for v in common.summary([v / lb for v, lb in zip(values, loopback)]).values())
        lines.append(f"| {key} | {rates} | {share} |")
    common.write_markdown(args.out, "copies", lines)


if __name__ == "__main__":
    main()
