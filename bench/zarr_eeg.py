"""Zarr benchmark: EEG-like windows [N,129,200] float32, zstd, 64 samples per chunk, served with
`block` and `full` shuffle, beside the same data served from .npy in the same run.

usage: python bench/zarr_eeg.py [--gib 3] [--cache-mib 512] [--runs 2] [--out bench/out]

Reports delivered samples/s, read amplification (decoded / delivered bytes), and the loader's
peak anonymous RSS against --chunk-cache-bytes. Beside them, in each run, what zstd decoding alone
costs: one thread decoding the dataset's first chunks (already read into memory) with libzstd
(numcodecs), as samples/s; on two cores this bounds what `block` can reach next to `.npy`. `full` shuffle over chunked data decodes a whole
chunk per sample, so it runs for --full-batches batches only (its rate is what matters).
Writes OUT/zarr_eeg.json and OUT/zarr_eeg.md. Needs release binaries, numpy and zarr-python.
"""

import argparse
import json
import os
import time

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from common import AnonSampler, ROOT, conveyor_run, start_loader, summary, write_markdown

SHAPE = (129, 200)
CHUNK = 64


def eeg_block(start, n, rng):
    """Smooth multi-channel signals plus noise, like band-limited EEG (compresses as real data does)."""
    t = (np.arange(start, start + n)[:, None, None] * SHAPE[1] + np.arange(SHAPE[1])[None, None, :]) / 250.0
    freqs = 1.0 + (np.arange(SHAPE[0])[None, :, None] % 30)
    signal = np.sin(2 * np.pi * freqs * t) * 20 + rng.standard_normal((n, *SHAPE)) * 5
    return np.round(signal, 1).astype(np.float32)


def make(out, gib):
    n = int(gib * (1 << 30)) // (SHAPE[0] * SHAPE[1] * 4)
    n -= n % 7 or 0  # any count works; keep it not a multiple of the chunk length
    n += 13
    zpath, npath = os.path.join(out, "eeg.zarr"), os.path.join(out, "eeg-npy")
    marker = os.path.join(out, f"eeg-{n}.done")
    if not os.path.exists(marker):
        os.makedirs(npath, exist_ok=True)
        arr = zarr.create_array(store=zpath, shape=(n, *SHAPE), chunks=(CHUNK, *SHAPE), dtype="float32",
                                compressors=[ZstdCodec(level=1)], overwrite=True)
        mm = np.lib.format.open_memmap(os.path.join(npath, "eeg.npy"), mode="w+", dtype=np.float32, shape=(n, *SHAPE))
        rng = np.random.default_rng(0)
        step = CHUNK * 16
        for start in range(0, n, step):
            block = eeg_block(start, min(step, n - start), rng)
            arr[start:start + len(block)] = block
            mm[start:start + len(block)] = block
        mm.flush()
        del mm
        open(marker, "w").close()
    return n, zpath, npath


def zstd_decode_rate(zpath, max_chunks=48):
    """Samples/s of one thread decoding the first chunks of the array with libzstd, the bytes
    already in memory: the decoding work `block` adds to what `.npy` does."""
    from numcodecs import Zstd
    chunk_dir = os.path.join(zpath, "c")
    names = sorted(os.listdir(chunk_dir), key=int)[:max_chunks]
    raw = []
    for name in names:
        with open(os.path.join(chunk_dir, name, "0", "0"), "rb") as f:
            raw.append(f.read())
    codec = Zstd()
    start = time.perf_counter()
    decoded = sum(len(codec.decode(r)) for r in raw)
    seconds = time.perf_counter() - start
    return decoded / (SHAPE[0] * SHAPE[1] * 4) / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--cache-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--full-batches", type=int, default=8)
    ap.add_argument("--max-inflight-mib", type=int, default=64)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args()
    data = os.path.join(args.out, "data")
    os.makedirs(data, exist_ok=True)
    n, zpath, npath = make(data, args.gib)
    cache = args.cache_mib << 20
    cases = {
        "npy, full shuffle": ("npy", ["--shuffle", "full"]),
        "zarr, block shuffle": ("eeg", ["--shuffle", "block", "--shuffle-window", str(args.window)]),
        "zarr, full shuffle": ("eeg", ["--shuffle", "full", "--max-batches", str(args.full_batches)]),
    }
    if args.only:
        cases = {k: v for k, v in cases.items() if args.only in k}
    results = {name: {"samples_per_s": [], "read_amplification": [], "loader_anon": []} for name in cases}
    decode_rates = []
    for run in range(args.runs):
        decode_rates.append(zstd_decode_rate(zpath))
        print(f"run {run} zstd decode alone, one thread: {decode_rates[-1]:.0f} samples/s", flush=True)
        for name, (dataset, extra) in cases.items():
            loader, addr = start_loader({"eeg": zpath, "npy": npath}, ["--chunk-cache-bytes", str(cache), "--max-inflight-bytes", str(args.max_inflight_mib << 20)])
            sampler = AnonSampler(loader.pid)
            sampler.start()
            stats = os.path.join(args.out, "zarr-stats.json")
            report = conveyor_run([addr], dataset, stats, ["--batch-size", str(args.batch), "--seed", str(run), *extra])
            sampler.stop.set()
            sampler.join()
            loader.terminate()
            loader.wait(timeout=30)
            r = results[name]
            r["samples_per_s"].append(report["samples_per_s"])
            r["read_amplification"].append(report["read_amplification"])
            r["loader_anon"].append(sampler.peak_kib * 1024)
            print(f"run {run} {name}: {report['samples_per_s']:.0f} samples/s, read amplification "
                  f"{report['read_amplification']:.3f}, loader anon RSS {sampler.peak_kib / 1024:.0f} MiB", flush=True)
    summarised = {name: {k: summary(v) for k, v in r.items()} for name, r in results.items()}
    block, npy = summarised.get("zarr, block shuffle"), summarised.get("npy, full shuffle")
    result = {"samples": n, "decoded_gib": n * SHAPE[0] * SHAPE[1] * 4 / 2**30, "cache_bytes": cache,
              "batch": args.batch, "window": args.window, "cases": summarised,
              "zstd_decode_samples_per_s": summary(decode_rates),
              "block_vs_npy": block["samples_per_s"]["median"] / npy["samples_per_s"]["median"] if block and npy else None}
    with open(os.path.join(args.out, "zarr_eeg.json"), "w") as f:
        json.dump(result, f, indent=2)
    mmm = lambda s, fmt: " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))
    lines = [
        f"Dataset: {n} EEG-like windows [129,200] float32 ({result['decoded_gib']:.1f} GiB decoded), zstd level 1, "
        f"{CHUNK} samples per chunk; batch {args.batch}, window {args.window} blocks, "
        f"--chunk-cache-bytes {args.cache_mib} MiB, --max-inflight-bytes {args.max_inflight_mib} MiB; {args.runs} runs (min / median / max)",
        "",
        "| case | samples/s | read amplification | loader peak anon RSS, MiB |",
        "|---|---|---|---|",
    ]
    for name, s in summarised.items():
        anon = {k: v / 2**20 for k, v in s["loader_anon"].items()}
        lines.append(f"| {name} | {mmm(s['samples_per_s'], '{:.0f}')} | {mmm(s['read_amplification'], '{:.3f}')} | "
                     f"{mmm(anon, '{:.0f}')} |")
    lines.append(f"| zstd decode alone, one thread (no I/O, no serving) | "
                 f"{mmm(result['zstd_decode_samples_per_s'], '{:.0f}')} | | |")
    ratio = f"{result['block_vs_npy']:.2f}" if result["block_vs_npy"] else "n/a"
    # The worst case in docs/memory.md for this configuration: the chunk cache, blocks held by running
    # gathers (4 assemble threads x a window of blocks), twice the in-flight budget, one stream's
    # send buffers (2 x 16 MiB), ~20 MiB of runtime, and the allocator's retained pages
    # (--allocator-retain-bytes, LOADER_ALLOCATOR_RETAIN_BYTES, 128 MiB by default).
    block_mib = CHUNK * SHAPE[0] * SHAPE[1] * 4 / 2**20
    retain_mib = int(os.environ.get("LOADER_ALLOCATOR_RETAIN_BYTES", 128 << 20)) / 2**20
    bound = args.cache_mib + 4 * args.window * block_mib + 2 * args.max_inflight_mib + 32 + 20 + retain_mib
    lines += ["", f"Zarr block shuffle / npy full shuffle (median samples/s): {ratio}; anonymous RSS bound "
              f"(docs/memory.md): cache {args.cache_mib} + gathers {4 * args.window * block_mib:.0f} + in flight "
              f"{2 * args.max_inflight_mib} + send buffers 32 + runtime 20 + retained {retain_mib:.0f} = {bound:.0f} MiB"]
    write_markdown(args.out, "zarr_eeg", lines)


if __name__ == "__main__":
    main()
