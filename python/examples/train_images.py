"""Train an image classifier on an image folder whose JPEGs are decoded and augmented on the loaders.

The training process never decodes an image: the loader reads `ROOT/CLASS/*.jpg` (torchvision's
ImageFolder layout) and runs the augmentation as a pipeline, so this script receives ready
`[B, 3, S, S] float32` batches. A checkpoint holds the model, the optimiser and the stream
position together, so a restart resumes all three exactly.

    cargo build --release --workspace
    python python/examples/train_images.py --write-demo-images /tmp/shapes    # or your own folder
    ./target/release/loader-server --listen 127.0.0.1:7070 --dataset images=/tmp/shapes \\
      --pipeline 'train=images:image: decode_image | random_resized_crop(64, scale=[0.5, 1]) | flip(axis=1) | to_chw | cast(float32, scale=1/255) | normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])' \\
      --pipeline 'val=images:image: decode_image | resize(72) | center_crop(64) | to_chw | cast(float32, scale=1/255) | normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])' &
    python python/examples/train_images.py --loader 127.0.0.1:7070 --epochs 3 --checkpoint /tmp/ckpt-images
"""

import argparse
import os
import time

import numpy as np
import torch

import conveyor


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loader", action="append", help="host:port of a loader (repeat for more)")
    ap.add_argument("--train", default="train", help="the loader's augmented dataset")
    ap.add_argument("--val", default="val", help="the loader's evaluation dataset ('' to skip)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--checkpoint", help="directory for model + optimiser + stream position; resumed from")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="batches between checkpoints")
    ap.add_argument("--max-batches", type=int, help="stop after this many batches (as if interrupted)")
    ap.add_argument("--indices-log", help="append every trained sample index (int64) to this file")
    ap.add_argument("--write-demo-images", metavar="DIR", help="write a small image folder (JPEGs of two classes: "
                    "mostly red or mostly blue shapes, varied sizes) to DIR and exit")
    return ap.parse_args()


def write_demo_images(root, per_class=120):
    """Two classes a small CNN learns in a few epochs: warm or cool scenes, 80-160 px, as JPEGs."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for label, name in enumerate(["warm", "cool"]):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(80, 161, size=2))
            base = np.array([200, 90, 40] if label == 0 else [40, 90, 200]) + rng.integers(-40, 40, size=3)
            image = Image.new("RGB", (w, h), tuple(int(v) for v in np.clip(base, 0, 255)))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
                colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
                draw.ellipse([x, y, x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))], fill=colour)
            image.save(os.path.join(root, name, f"{i:04d}.jpg"), quality=90)
    print(f"wrote {2 * per_class} images to {root}")


def model_for(num_classes):
    conv = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(),
                         torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*conv(3, 16), *conv(16, 32), *conv(32, 64), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(64, num_classes))


def main():
    args = parse_args()
    if args.write_demo_images:
        write_demo_images(args.write_demo_images)
        return
    if not args.loader:
        raise SystemExit("give --loader HOST:PORT (or --write-demo-images DIR first)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    train = conveyor.StreamingDataset(args.loader, args.train, batch_size=args.batch_size, seed=args.seed,
                                      output="torch", device=str(device))
    image_shape = train.info.fields["image"][1]
    if len(image_shape) != 3 or image_shape[0] != 3:
        raise SystemExit(f"dataset {args.train!r} gives images of shape {image_shape}; its pipeline should end in "
                         "to_chw and a float cast, as in this script's docstring")
    # ImageFolder's labels are class indices in sorted order; the loader serves them as `label`.
    torch.manual_seed(args.seed)
    model = model_for(num_classes=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    path = os.path.join(args.checkpoint, "images.pt") if args.checkpoint else None
    first_epoch, first_batch = 0, 0
    if path and os.path.exists(path):
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train.load_state_dict(state["data"])
        first_epoch, first_batch = state["epoch"], state["batch"]
        print(f"resuming at epoch {first_epoch} batch {first_batch}", flush=True)

    def save(epoch, batch_in_epoch):
        if path:
            os.makedirs(args.checkpoint, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": train.state_dict(),
                     "epoch": epoch, "batch": batch_in_epoch}
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # a crash leaves the old checkpoint or the new one

    log = open(args.indices_log, "ab") if args.indices_log else None
    trained = 0
    for epoch in range(first_epoch, args.epochs):
        train.set_epoch(epoch)  # after a resume, the resumed epoch keeps its position
        model.train()
        started, samples, loss_sum = time.monotonic(), 0, 0.0
        batch_in_epoch = first_batch if epoch == first_epoch else 0
        for batch in train:
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(batch["label"])
            loss_sum += loss.item() * len(batch["label"])
            trained += 1
            batch_in_epoch += 1
            if log:
                log.write(batch["__index__"].numpy().astype("<i8").tobytes())
            stop = args.max_batches is not None and trained >= args.max_batches
            if stop or trained % args.checkpoint_every == 0:
                save(epoch, batch_in_epoch)
            if stop:
                print(f"stopped after {trained} batches", flush=True)
                return
        seconds = time.monotonic() - started
        print(f"epoch {epoch}: {samples} samples, mean loss {loss_sum / max(samples, 1):.4f}, "
              f"{samples / seconds:.0f} samples/s, {train.stats()['wait_seconds']:.2f}s waiting for data", flush=True)
        save(epoch + 1, 0)
    if args.val:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in conveyor.StreamingDataset(args.loader, args.val, batch_size=128, shuffle="none",
                                                   output="torch", device=str(device)):
                correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
        print(f"accuracy on {args.val!r}: {correct / total:.3f} of {total} images", flush=True)


if __name__ == "__main__":
    main()
