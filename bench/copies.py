"""Copies per byte: one loader streaming to one client on loopback, two builds side by side.

usage: CONVEYOR_BIN_BEFORE=DIR python bench/copies.py [--runs 3] [--batches 1500] [--gib 2]
                                                     [--transports tcp,unix,shm]

For each run, in this order: raw TCP loopback (iperf3, 3 s) and memcpy bandwidth, then for each
build (CONVEYOR_BIN_BEFORE when set, then CONVEYOR_BIN or target/release) and each case,
`trainer-client stream` of `--batches` batches of 256 fully shuffled samples:
  images          [N,3,64,64] uint8 + int64 label, without tensors (the bytes reach the client)
  images tensors  the same into CPU tensors (`--tensors`: the training loop's path)
  chess tensors   [N,12,8,8] int16 + int64 label into CPU tensors (small samples)
With `--transports`, the newest build also runs the cases over the same-host path: `unix`
(the loader's `--listen-unix` socket, CONVEYOR_SHM=0: gRPC over a Unix socket), `shm` (the same
socket with a shared-memory region: the loader writes each batch once into it and the client's
tensors are views of it) and `detect` (the loader's TCP address, which the client finds to be on
this host: it moves to the socket the loader names and uses shared memory). In no case does the
client read the bytes after they arrive (over TCP the kernel has copied them into the client by
then; over `shm` nothing has). Both builds need
trainer-client built with `--features torch`. Each case starts with its dataset
read into the page cache. Beside each rate, the loader's minor page faults per batch: whether its
batch buffers are reused (none) or fresh pages (one per 4 KiB). Writes OUT/copies.json and
OUT/copies.md (min / median / max).
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


def stream(bin_dir, name, path, batches, seed, extra, out, transport="tcp"):
    common.BIN = bin_dir
    loader_args = ["--max-inflight-bytes", str(128 << 20)]
    socket = os.path.join(out, "copies-loader.sock")
    if transport != "tcp":
        loader_args += ["--listen-unix", socket]
    proc, addr = common.start_loader({name: path}, loader_args)
    faults_at_start = common.minor_faults(proc.pid)
    if transport in ("unix", "shm"):
        addr = f"unix:{socket}"
    shm_was = os.environ.get("CONVEYOR_SHM")
    os.environ["CONVEYOR_SHM"] = "0" if transport == "unix" else "1"
    try:
        report = common.conveyor_run([addr], name, os.path.join(out, "copies-stats.json"),
                                     ["--batch-size", "256", "--seed", str(seed), "--max-batches", str(batches),
                                      "--shuffle", "full", *extra])
    finally:
        if shm_was is None:
            del os.environ["CONVEYOR_SHM"]
        else:
            os.environ["CONVEYOR_SHM"] = shm_was
        faults = common.minor_faults(proc.pid) - faults_at_start
        proc.terminate()
        proc.wait(timeout=30)
    return report["bytes_per_s"], faults / batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=1500)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "out"))
    ap.add_argument("--transports", default="tcp",
                    help="comma-separated: tcp, unix (gRPC over a Unix socket), shm (Unix socket + shared memory), "
                         "detect (the TCP address of a loader with a socket: the client moves to it)")
    args = ap.parse_args()
    transports = [t for t in args.transports.split(",") if t != "tcp"]
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
    newest = list(builds)[-1]
    keys = [(b, c, "tcp") for b in builds for c in CASES] + [(newest, c, t) for t in transports for c in CASES]
    label = {key: f"{key[0]}: {key[1]}" + ("" if key[2] == "tcp" else f" ({key[2]})") for key in keys}
    results = {"loopback": [], "memcpy": [], **{label[key]: [] for key in keys}}
    # The loader's minor page faults per batch: a fresh batch buffer costs one per 4 KiB page
    # (768 for 3 MiB of images); reused buffers cost none, leaving first touches of mapped rows.
    faults_per_batch = {}
    for run in range(args.runs):
        results["loopback"].append(iperf3(3))
        results["memcpy"].append(memcpy_bandwidth())
        for key in keys:
            build, case, transport = key
            name, extra = CASES[case]
            warm_page_cache(paths[name])
            rate, faults = stream(builds[build], name, paths[name], args.batches, run, extra, args.out, transport)
            results[label[key]].append(rate)
            faults_per_batch.setdefault(label[key], []).append(faults)
            print(f"run {run}: {label[key]}: {rate / 1e6:.0f} MB/s "
                  f"({rate / results['loopback'][-1]:.2f} of loopback, "
                  f"{rate / results['memcpy'][-1]:.2f} of memcpy, "
                  f"loader {faults:.0f} minor faults per batch)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "copies.json"), "w") as f:
        json.dump({"runs": args.runs, "batches": args.batches, "builds": builds, "results": results,
                   "loader_minor_faults_per_batch": faults_per_batch}, f, indent=1)
    lines = [f"{args.runs} runs of {args.batches} batches x 256 fully shuffled samples, one loader on this host",
             "", "| measure (min / median / max) | MB/s | of iperf3 loopback (same run) | of memcpy (same run) "
             "| loader minor faults per batch |",
             "|---|---|---|---|---|"]

    def share(values, base):
        return "/".join(f"{v:.2f}" for v in common.summary([v / b for v, b in zip(values, base)]).values())

    for key, values in results.items():
        rates = "/".join(f"{v / 1e6:.0f}" for v in common.summary(values).values())
        if key in ("loopback", "memcpy"):
            lines.append(f"| {key} | {rates} | | | |")
        else:
            faults = "/".join(f"{v:.0f}" for v in common.summary(faults_per_batch[key]).values())
            lines.append(f"| {key} | {rates} | {share(values, results['loopback'])} | "
                         f"{share(values, results['memcpy'])} | {faults} |")
    common.write_markdown(args.out, "copies", lines)


if __name__ == "__main__":
    main()
