"""Train a small MLP on Conveyor's demo chess data from a plain PyTorch script.

The data workers are the loader processes: this script needs no DataLoader workers, and a loader
that dies or is added mid-epoch does not stop it. A checkpoint holds the model, the optimiser and
the stream position together, so a restart resumes all three exactly. With `--workers N` the
batches go through torchdata's StatefulDataLoader with N workers, whose state_dict() is then the
stream position (the dataset's own cannot know what the DataLoader has handed out).

    cargo build --release --workspace
    ./target/release/trainer-client write-demo-data --dir /tmp/chess --samples 200000
    ./target/release/loader-server --listen 127.0.0.1:7070 --dataset chess=/tmp/chess &
    python python/examples/train_chess.py --loader 127.0.0.1:7070 --epochs 2 --checkpoint /tmp/ckpt
    # Two data-parallel ranks on the CPU (gloo); each streams its own half of every epoch:
    torchrun --standalone --nproc-per-node 2 python/examples/train_chess.py --loader 127.0.0.1:7070
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import conveyor


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loader", action="append", required=True, help="host:port of a loader (repeat for more)")
    ap.add_argument("--dataset", default="chess")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--checkpoint", help="directory for model + optimiser + stream position; resumed from")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (torchdata's StatefulDataLoader)")
    ap.add_argument("--max-batches", type=int, help="stop after this many batches (as if interrupted)")
    ap.add_argument("--indices-log", help="append every trained sample index (int64) to this file; {rank} is "
                    "replaced by the rank")
    return ap.parse_args()


def main():
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0

    # rank and world_size come from torch.distributed when it is initialised.
    ds = conveyor.StreamingDataset(args.loader, args.dataset, batch_size=args.batch_size, seed=args.seed,
                                   output="torch", device=str(device))
    board_shape = ds.info.fields["board"][1]
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(board_shape)), 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 3)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)

    # What the loop iterates and what holds its position: the dataset itself, or a DataLoader
    # that keeps its workers' positions. Never a plain DataLoader with workers: its dataset's
    # state_dict() refuses, as it cannot know which batches were handed out.
    if args.workers:
        from torchdata.stateful_dataloader import StatefulDataLoader

        stream = StatefulDataLoader(ds, batch_size=None, num_workers=args.workers)
    else:
        stream = ds

    path = os.path.join(args.checkpoint, f"rank-{rank}.pt") if args.checkpoint else None
    first_epoch, first_batch = 0, 0
    if path and os.path.exists(path):
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        first_epoch, first_batch = state["epoch"], state["batch"]
        print(f"rank {rank}: resuming at epoch {first_epoch} batch {first_batch}", flush=True)

    def save(epoch, batch_in_epoch):
        if path:
            os.makedirs(args.checkpoint, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": stream.state_dict(),
                     "epoch": epoch, "batch": batch_in_epoch}
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # a crash leaves the old checkpoint or the new one

    log = open(args.indices_log.format(rank=rank), "ab") if args.indices_log else None
    trained = 0
    for epoch in range(first_epoch, args.epochs):
        ds.set_epoch(epoch)  # after a resume, the resumed epoch keeps its position
        started, samples, loss_sum = time.monotonic(), 0, 0.0
        batch_in_epoch = first_batch if epoch == first_epoch else 0
        for batch in stream:
            inputs = batch["board"].float()
            labels = batch["result"].long() + 1  # results are -1, 0, 1
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n = len(labels)
            samples += n
            loss_sum += loss.item() * n
            trained += 1
            batch_in_epoch += 1
            if log:
                log.write(batch["__index__"].numpy().astype("<i8").tobytes())
            stop = args.max_batches is not None and trained >= args.max_batches
            if stop or trained % args.checkpoint_every == 0:
                save(epoch, batch_in_epoch)
            if stop:
                print(f"rank {rank}: stopped after {trained} batches", flush=True)
                return
        seconds = time.monotonic() - started
        # With workers the counters are in the worker processes.
        waited = f", {ds.stats()['wait_seconds']:.2f}s waiting for data" if not args.workers else ""
        print(f"rank {rank} epoch {epoch}: {samples} samples, mean loss {loss_sum / max(samples, 1):.4f}, "
              f"{samples / seconds:.0f} samples/s{waited}", flush=True)
        save(epoch + 1, 0)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
