"""The conveyor Python package as a training script uses it; run by bench/suite.py.

usage: conveyor_python_contender.py LOADER DATASET SHUFFLE BATCHES SEED RESULT_JSON

Consumes BATCHES batches of 256 samples as CPU torch tensors in a Python loop (what
`trainer-client stream --tensors` does in Rust), and writes samples/s and bytes/s.
"""

import json
import sys
import time

import conveyor

BATCH = 256


def main(loader, dataset, shuffle, batches, seed, result_path):
    ds = conveyor.StreamingDataset([loader], dataset, batch_size=BATCH, shuffle=shuffle, seed=int(seed),
                                   output="torch")
    limit = int(batches)
    started = time.perf_counter()
    samples = nbytes = count = 0
    for batch in ds:
        for name, tensor in batch.items():
            if name != "__index__":
                nbytes += tensor.numel() * tensor.element_size()
        samples += len(batch["__index__"])
        count += 1
        if count >= limit:
            break
    seconds = time.perf_counter() - started
    with open(result_path, "w") as fh:
        json.dump({"samples_per_s": samples / seconds, "bytes_per_s": nbytes / seconds, "batches": count}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
