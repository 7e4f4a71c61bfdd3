"""The preconditioner form with AdamW, a GradScaler and an LR scheduler, under autocast.

``so.Preconditioner`` replaces each gradient by KFAC's direction; the loop keeps its own
optimizer, scheduler and loss scaling. On a GPU this is fp16 autocast with dynamic loss
scaling; on a CPU, bf16 autocast (the scaler is then switched off: bf16 needs none)::

    python examples/preconditioner_amp.py --epochs 3
"""

from __future__ import annotations

import torch
from _data import batches, final_loss, mlp, parser, teacher_data

import secondorder as so


def main(argv: list[str] | None = None) -> float:
    args = parser(__doc__, ["kfac", "kfac-ef", "tnt", "tnt-ef", "shampoo"], "kfac").parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    x, y = teacher_data(args.examples)
    x, y = x.to(device), y.to(device)
    model = mlp().to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    precond = so.Preconditioner(args.method, model, loss_fn=loss_fn, damping=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = args.epochs * (args.examples // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

    skipped = 0
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, args.batch):
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = loss_fn(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the statistics are taken from unscaled gradients
            skipped += not precond.step(scaler)  # .grad <- KFAC's direction (skipped on inf/NaN)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total, count = total + float(loss), count + 1
        print(f"epoch {epoch}: mean loss {total / count:.4f}")
    final = final_loss(model, loss_fn, x, y)
    print(f"final loss {final:.4f} ({skipped} steps skipped by the scaler; {device}, {dtype})")
    return final


if __name__ == "__main__":
    main()
