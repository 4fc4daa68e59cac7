"""Samples of different lengths, not decoded: the raw bytes path against the fixed-shape .npy path.

usage: python bench/ragged_bytes.py [--samples 8000] [--runs 3] [--batches 400] [--out bench/out]

The same image-like payloads (random bytes, sizes drawn around 110 KB like ImageNet's JPEGs)
served four ways by one loader to one client over loopback, in one run:
  npy            fixed-shape .npy rows of the mean size (the same bytes in all; the baseline
                 the other paths must approach: 0.8 of its MB/s is the aim)
  ragged npy     values.npy + values.offsets.npy (a ragged uint8 field)
  webdataset     tar shards of 1000 samples written with webdataset's TarWriter (.bin + .cls)
  image folder   one file per sample in 10 class directories (read per batch)
Each case streams `--batches` batches of 64 under full shuffle with `trainer-client stream`
(the bytes reach the client, no tensors); MB/s is what the client received (values and
offsets). Writes OUT/ragged_bytes.json and .md.
"""

import argparse
import json
import os

import numpy as np

import common
from suite import warm_page_cache


def make(root, n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.normal(110_000, 40_000, size=n), 10_000, 250_000).astype(np.int64)
    payload = [rng.integers(0, 256, size=int(s), dtype=np.uint8) for s in sizes]
    done = os.path.join(root, "done")
    if os.path.exists(done):
        return sizes
    import webdataset as wds

    os.makedirs(os.path.join(root, "npy"), exist_ok=True)
    fixed = rng.integers(0, 256, size=(n, int(sizes.mean())), dtype=np.uint8)
    np.save(os.path.join(root, "npy", "image.npy"), fixed)
    np.save(os.path.join(root, "npy", "label.npy"), np.arange(n, dtype=np.int64) % 10)
    del fixed
    os.makedirs(os.path.join(root, "ragged"), exist_ok=True)
    np.save(os.path.join(root, "ragged", "image.npy"), np.concatenate(payload))
    np.save(os.path.join(root, "ragged", "image.offsets.npy"), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    np.save(os.path.join(root, "ragged", "label.npy"), np.arange(n, dtype=np.int64) % 10)
    os.makedirs(os.path.join(root, "wds"), exist_ok=True)
    for shard in range(0, n, 1000):
        with wds.TarWriter(os.path.join(root, "wds", f"shard-{shard // 1000:05d}.tar")) as sink:
            for i in range(shard, min(n, shard + 1000)):
                sink.write({"__key__": f"{i:08d}", "bin": payload[i].tobytes(), "cls": i % 10})
    for i, p in enumerate(payload):
        d = os.path.join(root, "folder", f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:08d}.jpg"), "wb") as f:
            f.write(p.tobytes())
    open(done, "w").close()
    return sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "out"))
    args = ap.parse_args()
    root = os.path.join(args.out, "data", f"ragged-{args.samples}")
    sizes = make(root, args.samples)
    mean_bytes = float(sizes.mean())
    cases = {"npy": "npy", "ragged npy": "ragged", "webdataset": "wds", "image folder": "folder"}
    rates = {case: [] for case in cases}
    for run in range(args.runs):
        for case, sub in cases.items():
            path = os.path.join(root, sub)
            warm_page_cache(path)
            proc, addr = common.start_loader({"d": path}, ["--max-inflight-bytes", str(256 << 20)])
            try:
                report = common.conveyor_run([addr], "d", os.path.join(args.out, "ragged-stats.json"),
                                             ["--batch-size", "64", "--seed", str(run), "--max-batches",
                                              str(args.batches), "--shuffle", "full"])
            finally:
                proc.kill()
                proc.wait()
            mb_per_s = report["bytes_per_s"] / 1e6
            rates[case].append(mb_per_s)
            print(f"run {run}: {case}: {mb_per_s:.0f} MB/s ({report['samples_per_s']:.0f} samples/s)")
    result = {case: common.summary(v) for case, v in rates.items()}
    ratios = {case: common.summary([r / b for r, b in zip(v, rates["npy"])]) for case, v in rates.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ragged_bytes.json"), "w") as f:
        json.dump({"mb_per_s": result, "of_npy": ratios, "mean_sample_bytes": mean_bytes}, f, indent=2)

    def fmt(s, digits=0):
        return " / ".join(f"{s[k]:.{digits}f}" for k in ("min", "median", "max"))

    lines = [f"{args.runs} runs of {args.batches} batches x 64 fully shuffled samples "
             f"(mean {mean_bytes / 1000:.0f} KB), one loader on this host", "",
             "| case (min / median / max) | MB/s received | of the npy path (same run) |", "|---|---|---|"]
    lines += [f"| {case} | {fmt(result[case])} | {fmt(ratios[case], 2)} |" for case in cases]
    common.write_markdown(args.out, "ragged_bytes", lines)


if __name__ == "__main__":
    main()
