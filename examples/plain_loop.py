"""A hand-written loop with no closure: ``loss.backward(); opt.step()``.

KFAC built with ``loss_fn=`` watches your forward pass and your loss call (hooks on the model
and on that loss module) and takes its sampled-target backward there, so the loop is the one
you would write for ``torch.optim.SGD``::

    python examples/plain_loop.py --epochs 3
"""

from __future__ import annotations

import torch
from _data import batches, final_loss, mlp, parser, teacher_data

import secondorder as so


def main(argv: list[str] | None = None) -> float:
    args = parser(__doc__).parse_args(argv)

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
    final = final_loss(model, loss_fn, x, y)
    print(f"final loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
