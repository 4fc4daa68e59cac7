"""A JAX training loop on Conveyor batches: numpy arrays from the stream, a linear model fitted
with jax.grad (JAX on the CPU from PyPI: pip install "jax[cpu]").

    python python/examples/jax_linear.py --loader 127.0.0.1:7070 --epochs 2
"""

import argparse

import jax
import jax.numpy as jnp

import conveyor


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loader", action="append", required=True)
    ap.add_argument("--dataset", default="chess")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    ds = conveyor.StreamingDataset(args.loader, args.dataset, batch_size=args.batch_size, output="numpy")
    dim = 1
    for extent in ds.info.fields["board"][1]:
        dim *= extent
    params = {"w": jnp.zeros((dim, 3)), "b": jnp.zeros(3)}

    def loss_fn(params, x, y):
        logits = x @ params["w"] + params["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - args.lr * g, params, grads), loss

    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        total, samples = 0.0, 0
        for batch in ds:
            # The numpy arrays borrow the received message; jnp.asarray copies them to the device.
            x = jnp.asarray(batch["board"].reshape(len(batch["__index__"]), -1), dtype=jnp.float32)
            y = jnp.asarray(batch["result"].astype("int32") + 1)
            params, loss = step(params, x, y)
            total += float(loss) * len(y)
            samples += len(y)
        print(f"epoch {epoch}: {samples} samples, mean loss {total / samples:.4f}", flush=True)


if __name__ == "__main__":
    main()
