"""Preprocessing on the loaders against preprocessing in DataLoader workers, in one run.

usage: python bench/transforms.py [--runs 3] [--batches 200] [--samples 40000] [--out bench/out]

Workload: images [N,3,64,64] uint8 + int64 label (.npy, generated once under OUT/data), batch 256,
full shuffle, augmented by: random crop 56, horizontal flip p=0.5, float32 scaled to [0,1],
normalised per channel. Contenders, each consuming --batches batches as CPU torch tensors in the
training process:
  dataloader-torchvision  torch DataLoader, 2 workers, np.load(mmap_mode='r') per sample and
                          torchvision.transforms.v2 (the way users write it today)
  conveyor-pipeline       one loader, the built-in pipeline examples/transforms/image.pipeline
  conveyor-python         one loader, examples/transforms/augment.py:image_augment in 2 workers
Reported per contender (median of the runs, min-max beside): samples/s, CPU per batch of the
training process itself and of its process tree (DataLoader workers included), CPU per batch of
the loader tree (transform workers included), peak RSS of the training process tree, peak RSS
of the loader tree.
Needs: release loader-server (cargo build --release -p loader-server), the conveyor package,
torch and torchvision in this Python.
"""

import argparse
import json
import os
import sys

import numpy as np

from common import ROOT, run_contender_process, start_loader, summary

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(ROOT, "examples", "transforms")
CONTENDERS = ["dataloader-torchvision", "conveyor-pipeline", "conveyor-python"]


def images(out, n):
    path = os.path.join(out, "data", f"tx-images-{n}")
    if not os.path.exists(os.path.join(path, "label.npy")):
        os.makedirs(path, exist_ok=True)
        rng = np.random.default_rng(0)
        image = np.lib.format.open_memmap(os.path.join(path, "image.npy"), mode="w+", dtype=np.uint8,
                                          shape=(n, 3, 64, 64))
        for start in range(0, n, 8192):
            stop = min(n, start + 8192)
            image[start:stop] = rng.integers(0, 256, size=(stop - start, 3, 64, 64), dtype=np.uint8)
        image.flush()
        np.save(os.path.join(path, "label.npy"), np.arange(n, dtype=np.int64) % 1000)
    return path


def cpu_seconds_of(pid):
    """utime + stime of a process and its children that have exited and been waited for."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid):
    """CPU seconds of a process and its live descendants (transform workers)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += cpu_seconds_of(p)
            with open(f"/proc/{p}/task/{p}/children") as fh:
                stack += [int(c) for c in fh.read().split()]
        except FileNotFoundError:
            pass
    return total


def run_one(kind, source, batches, seed, out, loader_pid=None):
    result_path = os.path.join(out, "transform-contender.json")
    loader_cpu = tree_cpu_seconds(loader_pid) if loader_pid else 0.0
    args = [os.path.join(HERE, "transform_contender.py"), kind, source, str(batches), str(seed), result_path]
    result = run_contender_process(args, result_path, loader_pid)
    # The loader tree's CPU over the contender's whole run (its first batch included).
    loader_cpu = tree_cpu_seconds(loader_pid) - loader_cpu if loader_pid else 0.0
    result["loader_cpu_s_per_batch"] = loader_cpu / (result["batches"] + 1)
    return result


def run_contender(name, path, batches, seed, out):
    if name == "dataloader-torchvision":
        return run_one("dataloader", path, batches, seed, out)
    if name == "conveyor-pipeline":
        extra = ["--pipeline", f"aug=images:@{os.path.join(EXAMPLES, 'image.pipeline')}"]
    else:
        extra = ["--transform", "aug=images:augment:image_augment", "--transform-pythonpath", EXAMPLES,
                 "--transform-workers", "2", "--python", sys.executable]
    loader, addr = start_loader({"images": path}, extra)
    try:
        return run_one("conveyor", f"{addr}/aug", batches, seed, out, loader.pid)
    finally:
        loader.kill()
        loader.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = images(args.out, args.samples)
    results = {c: [] for c in CONTENDERS}
    for run in range(args.runs):
        for name in CONTENDERS:
            result = run_contender(name, path, args.batches, seed=run, out=args.out)
            results[name].append(result)
            print(f"run {run} {name}: {result['samples_per_s']:.0f} samples/s, "
                  f"trainer CPU {result['trainer_cpu_s_per_batch'] * 1000:.1f} ms/batch, "
                  f"trainer RSS {result['trainer_rss_mib']:.0f} MiB, loader RSS {result['loader_rss_mib']:.0f} MiB",
                  flush=True)
    keys = ["samples_per_s", "trainer_cpu_s_per_batch", "tree_cpu_s_per_batch", "loader_cpu_s_per_batch",
            "trainer_rss_mib", "loader_rss_mib"]
    table = {c: {k: summary([r[k] for r in rs]) for k in keys} for c, rs in results.items()}
    with open(os.path.join(args.out, "transforms.json"), "w") as fh:
        json.dump({"args": vars(args), "runs": results, "summary": table}, fh, indent=1)
    fmt = lambda s, scale=1, digits=0: f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"
    print("\n| contender | samples/s | trainer CPU ms/batch | trainer tree CPU ms/batch | loader tree CPU ms/batch | "
          "trainer tree RSS MiB | loader tree RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for c in CONTENDERS:
        t = table[c]
        print(f"| {c} | {fmt(t['samples_per_s'])} | {fmt(t['trainer_cpu_s_per_batch'], 1000, 1)} | "
              f"{fmt(t['tree_cpu_s_per_batch'], 1000, 1)} | {fmt(t['loader_cpu_s_per_batch'], 1000, 1)} | "
              f"{fmt(t['trainer_rss_mib'])} | {fmt(t['loader_rss_mib'])} |")
    base = table["dataloader-torchvision"]
    print()
    for c, aim in [("conveyor-python", 1.0), ("conveyor-pipeline", 3.0)]:
        ratio = table[c]["samples_per_s"]["median"] / base["samples_per_s"]["median"]
        print(f"{c}: {ratio:.2f}x the DataLoader's samples/s (aim >= {aim}x): {'met' if ratio >= aim else 'MISSED'}")
    for c in ["conveyor-pipeline", "conveyor-python"]:
        cpu = base["trainer_cpu_s_per_batch"]["median"] / table[c]["trainer_cpu_s_per_batch"]["median"]
        tree = base["tree_cpu_s_per_batch"]["median"] / table[c]["tree_cpu_s_per_batch"]["median"]
        rss = table[c]["trainer_rss_mib"]["median"] / base["trainer_rss_mib"]["median"]
        print(f"{c}: trainer-process CPU per batch {cpu:.1f}x lower, trainer process tree {tree:.1f}x lower "
              f"(aim >= 5x): {'met' if cpu >= 5 else 'MISSED'}; "
              f"trainer RSS {rss:.2f} of the DataLoader tree's (aim <= 0.25): {'met' if rss <= 0.25 else 'MISSED'}")


if __name__ == "__main__":
    main()
