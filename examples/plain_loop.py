"""A hand-written loop with no closure: ``loss.backward(); opt.step()``.

KFAC built with ``loss_fn=`` watches your forward pass and your loss call (hooks on the model
and on that loss module) and takes its sampled-target backward there, so the loop is the one
you would write for ``torch.optim.SGD``::

    python examples/plain_loop.py --epochs 3
"""

from __future__ import annotations

import argparse

import torch
from _data import batches, mlp, teacher_data

import secondorder as so


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)

    x, y = teacher_data(args.examples)
    model = mlp()
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = so.make_optimizer("kfac", model, lr=0.05, damping=0.1, loss_fn=loss_fn)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)

    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, args.batch):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()  # no closure: the optimizer saw the forward above
            total, count = total + float(loss), count + 1
        sched.step()
        print(f"epoch {epoch}: mean loss {total / count:.4f} (lr {sched.get_last_lr()[0]:.4f})")
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    print(f"final loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
