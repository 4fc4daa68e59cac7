"""JPEG decoding and augmentation: on the loaders against DataLoader workers, in one run.

usage: python bench/images.py [--runs 3] [--batches 60] [--images 50000] [--workers 2] [--out bench/out]

Data (generated once under OUT/data, not committed): an ImageFolder of --images JPEGs of varied
sizes around 500x375 (widths 400-600, heights 300-450; quality 90; smooth photo-like content with
noise, about 80 KB each) in 100 classes, and the same images as WebDataset shards of 1000.
Every contender runs the ImageNet training augmentation (decode, RandomResizedCrop(224), horizontal
flip p=0.5, to CHW float32 in [0, 1], per-channel Normalize) over a shuffled epoch, batch 128,
and hands the training loop CPU torch tensors `[128, 3, 224, 224] float32` + labels:
  dataloader-imagefolder  torchvision ImageFolder + transforms.v2 in a DataLoader, --workers
                          worker processes (how users write it today)
  webdataset              the webdataset library over the tars (shard shuffle + a 1000-sample
                          buffer, decode("pil"), the same transforms), DataLoader with --workers
  conveyor                one loader (--assemble-threads --workers, --allocator-retain-bytes
                          512MiB) running the pipeline
                          decode_image | random_resized_crop(224) | flip | to_chw | cast | normalize;
                          the conveyor package in the trainer over the same-host socket (shared
                          memory), 4 batches requested ahead (as the DataLoaders' 2 workers x
                          prefetch_factor 2)
The data is read once before each contender (page cache warm), so the comparison is of CPU work.
Every contender has the same CPU: the machine's cores are shared by the loader or the workers and
the training process alike. Reported per contender (median of the runs, min-max beside):
samples/s, peak RSS of the training process tree (DataLoader workers included) and of the loader.
Needs: release loader-server (cargo build --release -p loader-server), the conveyor package, torch,
torchvision, webdataset and Pillow in this Python.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time

import numpy as np

from common import run_contender_process, start_loader, summary

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ["dataloader-imagefolder", "webdataset", "conveyor"]
CLASSES = 100
SHARD = 1000
PIPELINE = ("image: decode_image | random_resized_crop(224) | flip(axis=1) | to_chw | cast(float32, scale=1/255) "
            "| normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])")


def textures():
    """A few photo-like 450x600 RGB textures (smooth gradients, waves and noise), from which each
    image is cut: varied content without paying for it per image."""
    rng = np.random.default_rng(12345)
    y, x = np.mgrid[0:450, 0:600].astype(np.float32)
    out = []
    for _ in range(16):
        c0, c1, c2 = rng.uniform(0, 255, size=(3, 3)).astype(np.float32)
        base = c0 + (x / 600)[..., None] * (c1 - c0) + (y / 450)[..., None] * (c2 - c0)
        waves = 30 * np.sin(x[..., None] / rng.uniform(5, 40) + y[..., None] / rng.uniform(5, 40) + rng.uniform(0, 6, 3))
        out.append(np.clip(base + waves + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8))
    return out


def write_images(args):
    """Writes JPEGs start..stop of the folder (one task of the generator pool): each a window of
    a texture, of its own size, shifted in colour."""
    from PIL import Image

    root, start, stop = args
    pool = textures()
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        top, left = int(rng.integers(0, 451 - h)), int(rng.integers(0, 601 - w))
        pixels = pool[i % len(pool)][top:top + h, left:left + w]
        pixels = (pixels.astype(np.int16) + rng.integers(-40, 40, size=3, dtype=np.int16)).clip(0, 255).astype(np.uint8)
        path = os.path.join(root, f"c{i % CLASSES:03d}", f"{i:06d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)


def dataset(out, n):
    """The image folder and its WebDataset shards, generated once."""
    root = os.path.join(out, "data", f"jpeg-folder-{n}")
    shards = os.path.join(out, "data", f"jpeg-shards-{n}")
    if not os.path.exists(os.path.join(root, "done")):
        for c in range(CLASSES):
            os.makedirs(os.path.join(root, f"c{c:03d}"), exist_ok=True)
        step = 2500
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(write_images, [(root, s, min(n, s + step)) for s in range(0, n, step)])
        open(os.path.join(root, "done"), "w").close()
    if not os.path.exists(os.path.join(shards, "done")):
        import webdataset as wds

        os.makedirs(shards, exist_ok=True)
        # The folder's samples in a fixed random order, so that each shard mixes classes.
        files = sorted((os.path.join(root, c, f), int(c[1:])) for c in os.listdir(root) if c.startswith("c")
                       for f in os.listdir(os.path.join(root, c)))
        order = np.random.default_rng(0).permutation(len(files))
        for s in range(0, len(files), SHARD):
            with wds.TarWriter(os.path.join(shards, f"train-{s // SHARD:05d}.tar")) as sink:
                for k in order[s:s + SHARD]:
                    path, label = files[k]
                    with open(path, "rb") as fh:
                        sink.write({"__key__": f"{k:06d}", "jpg": fh.read(), "cls": label})
        open(os.path.join(shards, "done"), "w").close()
    return root, shards


def run_one(kind, source, batches, workers, seed, out, loader_pid=None):
    result_path = os.path.join(out, "images-contender.json")
    args = [os.path.join(HERE, "images_contender.py"), kind, source, str(batches), str(workers), str(seed), result_path]
    return run_contender_process(args, result_path, loader_pid)


def warm(directory):
    """Reads every file under `directory`, so that each contender starts with the data in the
    page cache (the machine's memory holds both copies) and the comparison is of CPU work."""
    for dirpath, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                while fh.read(1 << 20):
                    pass


def run_contender(name, root, shards, args, seed):
    warm(shards if name == "webdataset" else root)
    if name == "dataloader-imagefolder":
        return run_one("dataloader", root, args.batches, args.workers, seed, args.out)
    if name == "webdataset":
        return run_one("webdataset", shards, args.batches, args.workers, seed, args.out)
    socket = os.path.join(tempfile.mkdtemp(prefix="conveyor-bench-"), "loader.sock")
    loader, _ = start_loader({"images": root}, [
        "--pipeline", f"aug=images:{PIPELINE}", "--assemble-threads", str(args.workers),
        "--listen-unix", socket, "--max-batch-bytes", "96MiB", "--max-inflight-bytes", "512MiB",
        # A batch is 77 MB of float32: keep a few of its freed buffers for reuse (see Memory).
        "--allocator-retain-bytes", "512MiB"])
    try:
        return run_one("conveyor", f"unix:{socket}/aug", args.batches, args.workers, seed, args.out, loader.pid)
    finally:
        loader.kill()
        loader.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    root, shards = dataset(args.out, args.images)
    print(f"data ready in {time.perf_counter() - started:.0f} s: {root}, {shards}", flush=True)
    results = {c: [] for c in CONTENDERS}
    for run in range(args.runs):
        for name in CONTENDERS:
            result = run_contender(name, root, shards, args, seed=run)
            results[name].append(result)
            print(f"run {run} {name}: {result['samples_per_s']:.0f} samples/s, "
                  f"trainer tree RSS {result['trainer_rss_mib']:.0f} MiB, loader RSS {result['loader_rss_mib']:.0f} MiB",
                  flush=True)
    keys = ["samples_per_s", "trainer_rss_mib", "loader_rss_mib"]
    table = {c: {k: summary([r[k] for r in rs]) for k in keys} for c, rs in results.items()}
    with open(os.path.join(args.out, "images.json"), "w") as fh:
        json.dump({"args": vars(args), "runs": results, "summary": table}, fh, indent=1)
    fmt = lambda s: f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"
    print("\n| contender | samples/s | training process tree peak RSS MiB | loader peak RSS MiB |")
    print("|---|---|---|---|")
    for c in CONTENDERS:
        t = table[c]
        loader = fmt(t["loader_rss_mib"]) if c == "conveyor" else "—"
        print(f"| {c} | {fmt(t['samples_per_s'])} | {fmt(t['trainer_rss_mib'])} | {loader} |")
    base = table["dataloader-imagefolder"]
    mine = table["conveyor"]
    speed = mine["samples_per_s"]["median"] / base["samples_per_s"]["median"]
    rss = mine["trainer_rss_mib"]["median"] / base["trainer_rss_mib"]["median"]
    print(f"\nconveyor: {speed:.2f}x the DataLoader's samples/s (aim >= 1.5x): {'met' if speed >= 1.5 else 'MISSED'}; "
          f"training process RSS {rss:.2f} of the DataLoader tree's (aim <= 0.25): {'met' if rss <= 0.25 else 'MISSED'}")
    wds_speed = mine["samples_per_s"]["median"] / table["webdataset"]["samples_per_s"]["median"]
    print(f"conveyor: {wds_speed:.2f}x webdataset's samples/s")


if __name__ == "__main__":
    main()
