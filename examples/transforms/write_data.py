"""Writes the small datasets of examples/transforms: images [N, 3, 64, 64] uint8 + label, and
EEG recordings [N, 16, 1000] float32 + label, as .npy directories under DIR.

usage: python write_data.py DIR [--samples N]
"""

import argparse
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.samples
    os.makedirs(os.path.join(args.dir, "images"), exist_ok=True)
    np.save(os.path.join(args.dir, "images", "image.npy"), rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8))
    np.save(os.path.join(args.dir, "images", "label.npy"), np.arange(n, dtype=np.int64) % 10)
    os.makedirs(os.path.join(args.dir, "eeg"), exist_ok=True)
    eeg = (rng.standard_normal((n, 16, 1000)) * 50).astype(np.float32)
    np.save(os.path.join(args.dir, "eeg", "eeg.npy"), eeg)
    np.save(os.path.join(args.dir, "eeg", "label.npy"), np.arange(n, dtype=np.int64) % 2)
    print(f"wrote {n} images and {n} recordings under {args.dir}")


if __name__ == "__main__":
    main()
