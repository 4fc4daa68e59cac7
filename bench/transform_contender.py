"""One contender of bench/transforms.py, in its own process (the training process).

usage: transform_contender.py KIND SOURCE BATCHES SEED RESULT_JSON
  KIND dataloader: SOURCE is the images directory; a DataLoader (2 workers) applies the
       torchvision.transforms.v2 augmentation per sample.
  KIND conveyor:   SOURCE is LOADER_ADDRESS/DATASET; the conveyor package streams the dataset the
       loader already augments.
Consumes BATCHES batches of 256 as CPU torch tensors and writes samples/s and the CPU time of
this process (its own threads) and of its tree (the DataLoader's workers added).
"""

import json
import os
import resource
import sys
import time

import numpy as np
import torch

BATCH = 256
WORKERS = 2
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Images(torch.utils.data.Dataset):
    """np.load(mmap_mode='r') per worker, one __getitem__ per sample, torchvision v2 transforms."""

    def __init__(self, path):
        from torchvision.transforms import v2

        self.path, self.images, self.labels = path, None, None
        self.n = len(np.load(os.path.join(path, "image.npy"), mmap_mode="r"))
        self.transform = v2.Compose([
            v2.RandomCrop(56),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.images is None:  # per worker, after fork
            self.images = np.load(os.path.join(self.path, "image.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(self.path, "label.npy"), mmap_mode="r")
        image = torch.from_numpy(np.array(self.images[i]))
        return self.transform(image), int(self.labels[i])


def batches(kind, source, seed):
    if kind == "dataloader":
        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(int(seed))
        loader = torch.utils.data.DataLoader(Images(source), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                             generator=generator)
        for images, labels in loader:
            yield images, labels
    else:
        import conveyor

        addr, dataset = source.rsplit("/", 1)
        ds = conveyor.StreamingDataset([addr], dataset, batch_size=BATCH, seed=int(seed), output="torch")
        for batch in ds:
            yield batch["image"], batch["label"]


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main(kind, source, num_batches, seed, result_path):
    limit = int(num_batches)
    stream = batches(kind, source, seed)
    first = next(stream)  # start-up (workers, connections) is not timed
    assert first[0].shape[1:] == (3, 56, 56) and first[0].dtype == torch.float32, first[0].shape
    cpu_before = cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    samples = count = 0
    checksum = 0.0
    for images, labels in stream:
        checksum += float(images[0, 0, 0, 0])  # touch the data, as a training step would
        samples += len(labels)
        count += 1
        if count >= limit:
            break
    seconds = time.perf_counter() - started
    own_cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    del stream  # joins DataLoader workers, so that their CPU time is counted below
    with open(result_path, "w") as fh:
        json.dump({
            "samples_per_s": samples / seconds,
            "batches": count,
            "trainer_cpu_s_per_batch": own_cpu / count,
            # DataLoader workers, whole run (start-up and the first batch included).
            "tree_cpu_s_per_batch": (own_cpu + cpu_seconds(resource.RUSAGE_CHILDREN)) / count,
        }, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
