"""One PyTorch DataLoader contender, as users write it today; run by bench/suite.py.

usage: dataloader_contender.py KIND DATASET_PATH BATCHES SEED RESULT_JSON
"""

import glob
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

BATCH = 256
WORKERS = 2


class NpyPerSample(Dataset):
    """The common lazy loader: np.load(mmap_mode='r') and one __getitem__ per sample."""

    def __init__(self, path):
        self.path = path
        self.names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(path, "*.npy")))
        self.arrays = None
        self.n = len(np.load(os.path.join(path, self.names[0] + ".npy"), mmap_mode="r"))

    def _open(self):
        if self.arrays is None:  # per worker, after fork
            self.arrays = [np.load(os.path.join(self.path, n + ".npy"), mmap_mode="r") for n in self.names]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self._open()
        return tuple(torch.from_numpy(np.array(a[i])) for a in self.arrays)


class NpyBatched(NpyPerSample):
    """What an expert writes: the sampler yields whole batches; one fancy-indexing read per field."""

    def __getitem__(self, indices):
        self._open()
        idx = np.sort(np.asarray(indices))
        return tuple(torch.from_numpy(a[idx]) for a in self.arrays)


class ZarrPerSample(Dataset):
    def __init__(self, path):
        self.path, self.arr = path, None
        import zarr
        self.n = zarr.open_array(path, mode="r").shape[0]

    def __len__(self):
        return self.n

    def _open(self):
        if self.arr is None:
            import zarr
            self.arr = zarr.open_array(self.path, mode="r")

    def __getitem__(self, i):
        self._open()
        return torch.from_numpy(self.arr[i])


class ZarrBatched(ZarrPerSample):
    def __getitem__(self, indices):
        self._open()
        idx = np.sort(np.asarray(indices))
        # One read per chunk the batch touches (a window's 8 chunks), then select rows.
        parts = []
        for chunk in np.unique(idx // 64):
            rows = idx[idx // 64 == chunk]
            lo = chunk * 64
            parts.append(self.arr[lo:min(lo + 64, self.n)][rows - lo])
        return torch.from_numpy(np.concatenate(parts))


class ChunkAwareBatches(Sampler):
    """Chunks in random order, samples shuffled within a window of 8 chunks, cut into batches."""

    def __init__(self, n, chunk, seed, window=8):
        self.n, self.chunk, self.seed, self.window = n, chunk, seed, window

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        chunks = rng.permutation((self.n + self.chunk - 1) // self.chunk)
        for w in range(0, len(chunks), self.window):
            rows = np.concatenate([np.arange(c * self.chunk, min(self.n, (c + 1) * self.chunk)) for c in chunks[w:w + self.window]])
            rng.shuffle(rows)
            for b in range(0, len(rows), BATCH):
                yield rows[b:b + BATCH].tolist()

    def __len__(self):
        return (self.n + BATCH - 1) // BATCH


def main(kind, path, batches, seed, result_path):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "dataloader-per-sample":
        ds = NpyPerSample(path)
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, generator=g, persistent_workers=False)
    elif kind == "dataloader-batched":
        ds = NpyBatched(path)
        sampler = BatchSampler(RandomSampler(ds, generator=g), BATCH, drop_last=False)
        loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=WORKERS)
    elif kind == "zarr-dataloader-full":
        ds = ZarrPerSample(path)
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, generator=g)
    elif kind == "zarr-dataloader-chunked":
        ds = ZarrBatched(path)
        loader = DataLoader(ds, sampler=ChunkAwareBatches(ds.n, 64, seed), batch_size=None, num_workers=WORKERS)
    else:
        sys.exit(f"unknown contender {kind}")
    samples = nbytes = 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        tensors = batch if isinstance(batch, (tuple, list)) else (batch,)
        samples += len(tensors[0])
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
        if i + 1 >= batches:
            break
    seconds = time.perf_counter() - start
    with open(result_path, "w") as f:
        json.dump({"samples_per_s": samples / seconds, "bytes_per_s": nbytes / seconds, "samples": samples}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
