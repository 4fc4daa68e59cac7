"""Benchmark suite: Conveyor against what users run today, side by side in one run.

usage: python bench/suite.py [--runs 3] [--batches 1000] [--gib 3] [--out bench/out]

Datasets (generated once under OUT/data, several GiB each):
  chess  [N,12,8,8] int16 + int64 label (.npy)
  images [N,3,64,64] uint8 + int64 label (.npy)
  eeg    [N,129,200] float32, zstd, 64 samples per chunk (Zarr)
Contenders, each consuming `--batches` batches of 256 shuffled samples into CPU tensors:
  conveyor-1, conveyor-2    trainer-client (torch build, --tensors) from 1 or 2 loaders on loopback
  conveyor-python           the conveyor Python package (torch tensors in a Python loop), 1 loader
  dataloader-per-sample     torch DataLoader over np.load(mmap_mode='r'), __getitem__ per sample, 2 workers
  dataloader-batched        DataLoader with a batch sampler and fancy indexing, 2 workers
  zarr-dataloader-full      zarr-python in a DataLoader (2 workers), full shuffle, per-sample reads
  zarr-dataloader-chunked   zarr-python in a DataLoader (2 workers), chunk-aware shuffle, batched reads
Limits measured in the same run: raw TCP loopback (iperf3) and memcpy bandwidth.
Every contender starts with its dataset read once into the page cache (see warm_page_cache).
Writes OUT/suite.json, OUT/suite.md and OUT/suite.png.
Needs: release loader-server, trainer-client built with --features torch, the conveyor package
(pip install ./python), torch, zarr, matplotlib, iperf3. --only chess,images runs a subset.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from common import AnonSampler, ROOT, conveyor_run, start_loader, summary, tree_rss_kib

BATCH = 256


def gen_npy(path, n, fields, make):
    marker = os.path.join(path, f"done-{n}")
    if os.path.exists(marker):
        return
    os.makedirs(path, exist_ok=True)
    maps = {name: np.lib.format.open_memmap(os.path.join(path, f"{name}.npy"), mode="w+", dtype=dt, shape=(n, *shape))
            for name, (dt, shape) in fields.items()}
    rng = np.random.default_rng(0)
    step = 65536
    for start in range(0, n, step):
        stop = min(n, start + step)
        for name, arr in make(start, stop, rng).items():
            maps[name][start:stop] = arr
    for m in maps.values():
        m.flush()
    open(marker, "w").close()


def datasets(out, gib):
    data = os.path.join(out, "data")
    n_chess = int(gib * 2**30) // (12 * 8 * 8 * 2 + 8)
    gen_npy(os.path.join(data, "chess"), n_chess, {"board": (np.int16, (12, 8, 8)), "label": (np.int64, ())},
            lambda a, b, rng: {"board": rng.integers(0, 2, size=(b - a, 12, 8, 8), dtype=np.int16),
                               "label": np.arange(a, b, dtype=np.int64) % 4672})
    n_img = int(gib * 2**30) // (3 * 64 * 64 + 8)
    gen_npy(os.path.join(data, "images"), n_img, {"image": (np.uint8, (3, 64, 64)), "label": (np.int64, ())},
            lambda a, b, rng: {"image": rng.integers(0, 256, size=(b - a, 3, 64, 64), dtype=np.uint8),
                               "label": np.arange(a, b, dtype=np.int64) % 1000})
    sys.path.insert(0, os.path.dirname(__file__))
    import zarr_eeg
    n_eeg, zpath, _ = zarr_eeg.make(data, gib)
    return {
        "chess": {"kind": "npy", "path": os.path.join(data, "chess"), "n": n_chess, "sample_bytes": 1544},
        "images": {"kind": "npy", "path": os.path.join(data, "images"), "n": n_img, "sample_bytes": 12296},
        "eeg": {"kind": "zarr", "path": zpath, "n": n_eeg, "sample_bytes": 129 * 200 * 4},
    }


def warm_page_cache(path):
    """Reads every file of a dataset once, so that each contender starts with it in the page
    cache: this VM hands idle page cache back to the host, so data read minutes earlier may be
    gone, and the first contender would pay the disk reads for the ones after it."""
    buf = bytearray(16 << 20)
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def run_python_contender(kind, ds, batches, seed, out, script="dataloader_contender.py", args=None):
    """Runs a contender script in its own process tree; samples the tree's RSS."""
    result_path = os.path.join(out, "contender.json")
    args = args or [kind, ds["path"], str(batches), str(seed)]
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), script), *args, result_path])
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed")
    with open(result_path) as f:
        result = json.load(f)
    result["peak_rss_bytes"] = peak * 1024
    result["loader_anon_bytes"] = 0
    return result


def run_conveyor_python(name, ds, batches, seed, out):
    """The conveyor Python package against one loader; RSS of the training process tree."""
    shuffle = "block" if ds["kind"] == "zarr" else "full"
    loader, addr = start_loader({name: ds["path"]}, ["--max-inflight-bytes", str(128 << 20),
                                                     "--chunk-cache-bytes", str(512 << 20)])
    sampler = AnonSampler(loader.pid)
    sampler.start()
    try:
        result = run_python_contender("conveyor-python", ds, batches, seed, out, "conveyor_python_contender.py",
                                      [addr, name, shuffle, str(batches), str(seed)])
    finally:
        sampler.stop.set()
        sampler.join()
        loader.terminate()
        loader.wait(timeout=30)
    result["loader_anon_bytes"] = sampler.peak_kib * 1024
    return result


def run_conveyor(replicas, name, ds, batches, seed, out):
    shuffle = ["--shuffle", "block", "--shuffle-window", "8"] if ds["kind"] == "zarr" else ["--shuffle", "full"]
    loaders = [start_loader({name: ds["path"]}, ["--max-inflight-bytes", str(128 << 20), "--chunk-cache-bytes", str(512 << 20)])
               for _ in range(replicas)]
    samplers = [AnonSampler(p.pid) for p, _ in loaders]
    for s in samplers:
        s.start()
    try:
        report = conveyor_run([a for _, a in loaders], name, os.path.join(out, "conveyor-stats.json"),
                              ["--batch-size", str(BATCH), "--seed", str(seed), "--max-batches", str(batches),
                               "--tensors", *shuffle])
    finally:
        for s in samplers:
            s.stop.set()
            s.join()
        for p, _ in loaders:
            p.terminate()
            p.wait(timeout=30)
    return {"samples_per_s": report["samples_per_s"], "bytes_per_s": report["bytes_per_s"],
            "peak_rss_bytes": report["peak_rss_bytes"], "loader_anon_bytes": sum(s.peak_kib for s in samplers) * 1024}


def memcpy_bandwidth():
    a = np.ones(1 << 28, dtype=np.uint8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--only", default="chess,images,eeg", help="comma-separated datasets to run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    all_ds = datasets(args.out, args.gib)
    from npy_loopback import iperf3

    contenders = {
        "chess": ["conveyor-1", "conveyor-2", "conveyor-python", "dataloader-per-sample", "dataloader-batched"],
        "images": ["conveyor-1", "conveyor-2", "conveyor-python", "dataloader-per-sample", "dataloader-batched"],
        "eeg": ["conveyor-1", "conveyor-2", "conveyor-python", "zarr-dataloader-full", "zarr-dataloader-chunked"],
    }
    contenders = {name: cs for name, cs in contenders.items() if name in args.only.split(",")}
    results = {d: {c: [] for c in cs} for d, cs in contenders.items()}
    limits = {"loopback_bytes_per_s": [], "memcpy_bytes_per_s": []}
    for run in range(args.runs):
        limits["loopback_bytes_per_s"].append(iperf3(3))
        limits["memcpy_bytes_per_s"].append(memcpy_bandwidth())
        for name, cs in contenders.items():
            ds = all_ds[name]
            # Full-shuffle zarr decodes a chunk per sample (~0.5 s a batch): 30 batches are enough.
            for c in cs:
                warm_page_cache(ds["path"])
                batches = min(30, args.batches) if c == "zarr-dataloader-full" else args.batches
                if c == "conveyor-python":
                    r = run_conveyor_python(name, ds, batches, run, args.out)
                elif c.startswith("conveyor"):
                    r = run_conveyor(int(c[-1]), name, ds, batches, run, args.out)
                else:
                    r = run_python_contender(c, ds, batches, run, args.out)
                results[name][c].append(r)
                print(f"run {run} {name} {c}: {r['samples_per_s']:.0f} samples/s, {r['bytes_per_s'] / 1e6:.0f} MB/s, "
                      f"trainer RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, loaders anon {r['loader_anon_bytes'] / 2**20:.0f} MiB",
                      flush=True)
    write_report(args, all_ds, contenders, results, limits)


def aim_lines(results, limits):
    """The issue's aims, each as per-run ratios and whether the median meets it."""
    def ratio(dataset, a, b, key="samples_per_s"):
        return [x[key] / y[key] for x, y in zip(results[dataset][a], results[dataset][b])]

    def line(text, values, aim):
        s = summary(values)
        verdict = "met" if s["median"] >= aim else "missed"
        return f"- {text}: {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} (aim {aim}: {verdict} at the median)"

    loopback = limits["loopback_bytes_per_s"]
    out = []
    if "chess" in results:
        for c in ("conveyor-1", "conveyor-2", "conveyor-python"):
            out.append(line(f"chess, {c} / per-sample DataLoader", ratio("chess", c, "dataloader-per-sample"), 5))
            out.append(line(f"chess, {c} / batched DataLoader", ratio("chess", c, "dataloader-batched"), 1.5))
    if "images" in results:
        for c in ("conveyor-1", "conveyor-2"):
            share = [r["bytes_per_s"] / lb for r, lb in zip(results["images"][c], loopback)]
            out.append(line(f"images, {c} MB/s / TCP loopback", share, 0.6))
    if "eeg" in results:
        for c in ("conveyor-1", "conveyor-2"):
            out.append(line(f"eeg, {c} (block) / zarr-python DataLoader, full shuffle",
                            ratio("eeg", c, "zarr-dataloader-full"), 3))
            out.append(line(f"eeg, {c} (block) / zarr-python DataLoader, chunk-aware",
                            ratio("eeg", c, "zarr-dataloader-chunked"), 3))
    for name in ("chess", "images"):
        if name in results:
            out.append(line(f"{name}, conveyor-python / conveyor-1 (Rust stream --tensors)",
                            ratio(name, "conveyor-python", "conveyor-1"), 0.9))
    for name, contender in (("chess", "dataloader-per-sample"), ("images", "dataloader-per-sample"),
                            ("eeg", "zarr-dataloader-chunked")):
        if name not in results:
            continue
        # The aim is trainer RSS at most half the DataLoader tree's: the inverse ratio at least 2.
        out.append(line(f"{name}, {contender} tree peak RSS / Conveyor-2 trainer peak RSS",
                        ratio(name, contender, "conveyor-2", "peak_rss_bytes"), 2))
        # The Python package's training process: at most a quarter of the DataLoader tree's.
        out.append(line(f"{name}, {contender} tree peak RSS / conveyor-python process peak RSS",
                        ratio(name, contender, "conveyor-python", "peak_rss_bytes"), 4))
    return out


def write_report(args, all_ds, contenders, results, limits):
    table = {}
    lines = [f"{args.runs} runs of {args.batches} batches x {BATCH} shuffled samples into CPU tensors; "
             "min / median / max. Ratios are Conveyor (1 loader) / contender, per run.", ""]
    lo = summary(limits["loopback_bytes_per_s"])
    mc = summary(limits["memcpy_bytes_per_s"])
    lines.append(f"Limits in the same runs: TCP loopback {lo['min'] / 1e9:.2f} / {lo['median'] / 1e9:.2f} / {lo['max'] / 1e9:.2f} GB/s, "
                 f"memcpy {mc['min'] / 1e9:.1f} / {mc['median'] / 1e9:.1f} / {mc['max'] / 1e9:.1f} GB/s")
    for name, cs in contenders.items():
        ds = all_ds[name]
        lines += ["", f"**{name}** ({ds['n']} samples, {ds['n'] * ds['sample_bytes'] / 2**30:.1f} GiB)", "",
                  "| contender | samples/s | MB/s | trainer peak RSS MiB | loaders peak anon MiB | Conveyor-1 / this |",
                  "|---|---|---|---|---|---|"]
        base = [r["samples_per_s"] for r in results[name]["conveyor-1"]]
        table[name] = {}
        for c in cs:
            rs = results[name][c]
            sps = summary([r["samples_per_s"] for r in rs])
            mbs = summary([r["bytes_per_s"] / 1e6 for r in rs])
            rss = summary([r["peak_rss_bytes"] / 2**20 for r in rs])
            anon = summary([r["loader_anon_bytes"] / 2**20 for r in rs])
            ratio = summary([b / r["samples_per_s"] for b, r in zip(base, rs)])
            table[name][c] = {"samples_per_s": sps, "mb_per_s": mbs, "trainer_rss_mib": rss, "loader_anon_mib": anon, "ratio": ratio}
            f = lambda s, p=0: f"{s['min']:.{p}f} / {s['median']:.{p}f} / {s['max']:.{p}f}"
            lines.append(f"| {c} | {f(sps)} | {f(mbs)} | {f(rss)} | {f(anon)} | {f(ratio, 2)} |")
    aims = aim_lines(results, limits)
    lines += ["", "**Aims** (per-run ratios, min / median / max)", ""] + aims
    with open(os.path.join(args.out, "suite.json"), "w") as fh:
        json.dump({"results": table, "limits": {"loopback": lo, "memcpy": mc}, "aims": aims}, fh, indent=2)
    with open(os.path.join(args.out, "suite.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(contenders), figsize=(5 * len(contenders), 4), squeeze=False)
    axes = axes[0]
    for ax, (name, cs) in zip(axes, contenders.items()):
        med = [table[name][c]["samples_per_s"]["median"] for c in cs]
        err = [[m - table[name][c]["samples_per_s"]["min"] for c, m in zip(cs, med)],
               [table[name][c]["samples_per_s"]["max"] - m for c, m in zip(cs, med)]]
        ax.bar(range(len(cs)), med, yerr=err, color=["#1f77b4", "#1f77b4", "#2ca02c", "#999999", "#666666"])
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels(cs, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("samples/s (median, min-max)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "suite.png"), dpi=100)


if __name__ == "__main__":
    main()
