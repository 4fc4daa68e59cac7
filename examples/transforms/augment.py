"""Preprocessing functions for `loader-server --transform NAME=SOURCE:augment:FUNCTION`.

They run in the loader's worker processes, not in the training process. Each receives the
gathered batch as a dict of numpy arrays (views of shared memory: read them, do not keep them),
the global sample indices of its rows, and a seeded `numpy.random.Generator`; it returns a dict
of numpy arrays with one row per input sample.

The contract that makes batches deterministic (the same request gives the same bytes on every
replica, after any retry or resume): draw every random number from `rng`, keep no state between
calls, and do not depend on the time, the process or the worker.
"""

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def image_augment(batch, indices, rng, size=56):
    """Images [N, C, H, W] uint8: a random size x size crop, a horizontal flip with probability
    0.5, then float32 normalised per channel (ImageNet mean and std)."""
    images = batch["image"]
    n, _, height, width = images.shape
    tops = rng.integers(0, height - size + 1, n)
    lefts = rng.integers(0, width - size + 1, n)
    flips = rng.random(n) < 0.5
    windows = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(2, 3))
    crops = windows[np.arange(n), :, tops, lefts]  # [N, C, size, size]
    crops = np.where(flips[:, None, None, None], crops[..., ::-1], crops)
    out = (crops.astype(np.float32) * np.float32(1 / 255) - MEAN) / STD
    return {"image": out, "label": batch["label"]}


def eeg_window(batch, indices, rng, length=200):
    """Recordings [N, channels, time]: one random window of `length` steps per sample, each
    channel standardised within its window."""
    eeg = batch["eeg"]
    n, _, steps = eeg.shape
    starts = rng.integers(0, steps - length + 1, n)
    windows = np.lib.stride_tricks.sliding_window_view(eeg, length, axis=2)[np.arange(n), :, starts]
    windows = windows.astype(np.float32)
    mean = windows.mean(axis=2, keepdims=True)
    std = windows.std(axis=2, keepdims=True) + np.float32(1e-6)
    return {"eeg": (windows - mean) / std, "label": batch["label"]}
