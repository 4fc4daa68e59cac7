"""One contender of bench/images.py, in its own process (the training process).

usage: images_contender.py KIND SOURCE BATCHES WORKERS SEED RESULT_JSON
  KIND dataloader:  SOURCE is the image folder; torchvision ImageFolder + transforms.v2 in a
       DataLoader with WORKERS worker processes.
  KIND webdataset:  SOURCE is the shard directory; the webdataset library with the same
       transforms, in a DataLoader with WORKERS workers (each reads its own shards).
  KIND conveyor:    SOURCE is LOADER_ADDRESS/DATASET; the conveyor package streams the batches
       the loader already decoded and augmented.
Consumes BATCHES batches of 128 as CPU torch tensors and writes samples/s.
"""

import glob
import json
import os
import sys
import time

import torch

BATCH = 128
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def transform():
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(224, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def batches(kind, source, workers, seed):
    torch.set_num_threads(1)
    if kind == "dataloader":
        from torchvision.datasets import ImageFolder

        generator = torch.Generator().manual_seed(int(seed))
        data = ImageFolder(source, transform=transform())
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                             generator=generator, persistent_workers=False)
        yield from loader
    elif kind == "webdataset":
        import webdataset as wds

        shards = sorted(glob.glob(os.path.join(source, "*.tar")))
        data = (wds.WebDataset(shards, shardshuffle=len(shards), seed=int(seed), nodesplitter=wds.split_by_node,
                               workersplitter=wds.split_by_worker)
                .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(transform(), lambda c: c)
                .batched(BATCH, partial=False))
        loader = wds.WebLoader(data, batch_size=None, num_workers=workers)
        yield from loader
    else:
        import conveyor

        addr, dataset = source.rsplit("/", 1)
        # Four batches ahead, as the DataLoader's 2 workers x prefetch_factor 2.
        ds = conveyor.StreamingDataset([addr], dataset, batch_size=BATCH, seed=int(seed), output="torch", prefetch=4)
        for batch in ds:
            yield batch["image"], batch["label"]


def main(kind, source, num_batches, workers, seed, result_path):
    limit = int(num_batches)
    stream = batches(kind, source, int(workers), seed)
    first = next(stream)  # start-up (workers, connections) is not timed
    assert tuple(first[0].shape) == (BATCH, 3, 224, 224) and first[0].dtype == torch.float32, first[0].shape
    started = time.perf_counter()
    count = 0
    checksum = 0.0
    for images, labels in stream:
        checksum += float(images[:, 0, 0, 0].sum())  # touch the batch as a training step would
        count += 1
        if count == limit:
            break
    elapsed = time.perf_counter() - started
    if count < limit:
        raise SystemExit(f"{kind}: only {count} batches after the first; use fewer --batches or more --images")
    with open(result_path, "w") as fh:
        json.dump({"kind": kind, "batches": count, "samples_per_s": count * BATCH / elapsed}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
